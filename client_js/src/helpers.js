// Helpers of the client that need no client: retry timing, query strings, rendering a list.
// src/tailor.js re-exports them (they are part of the ES module build's API).

/** Jittered exponential delay in ms for the `attempt`-th retry (0-based): half fixed, half random. */
export function backoff(attempt, random, base = 1000, cap = 60000) {
  const full = Math.min(cap, base * 2 ** attempt);
  return Math.round(full / 2 + (random() * full) / 2);
}

/** A Retry-After header (seconds or an HTTP date) in ms from `now`; 0 if absent or unreadable. */
export function retryAfterMs(value, now) {
  if (!value) return 0;
  const seconds = Number(value);
  if (seconds >= 0) return seconds * 1000;
  const at = Date.parse(value);
  return at > now ? at - now : 0;
}

/** `a=1&b=x,y` from an object, skipping null, undefined, "" and [], joining arrays with commas. */
export function query(params) {
  return Object.keys(params)
    .map((k) => [k, params[k] == null ? "" : [].concat(params[k]).join(",")])
    .filter((kv) => kv[1] !== "")
    .map((kv) => kv[0] + "=" + encodeURIComponent(kv[1]))
    .join("&");
}

/**
 * Fill `container` (an element or a selector) with one element per item and mark each with
 * data-tailor-item / data-tailor-request. `recs` is a recommendations answer ({request_id, items})
 * or a bare array of items; `template(item, index)` returns an element or the HTML of one
 * (default: a div.tailor-item with the escaped title). Clicks inside a marked element call
 * `onClick(itemId, requestId)` (one listener per container).
 */
export function renderInto(doc, container, recs, template, onClick) {
  const box = typeof container == "string" ? doc.querySelector(container) : container;
  if (!box) return null;
  const items = (Array.isArray(recs) ? recs : recs && recs.items) || [];
  const request = (recs && recs.request_id) || "";
  box.textContent = "";
  items.forEach((item, i) => {
    let el = template ? template(item, i) : null;
    if (typeof el == "string") {
      const wrap = doc.createElement("div");
      wrap.innerHTML = el.trim();
      el = wrap.firstElementChild;
    }
    if (!el) {
      el = doc.createElement("div");
      el.className = "tailor-item";
      el.textContent = item.title || item.id;
    }
    el.setAttribute("data-tailor-item", item.id);
    el.setAttribute("data-tailor-request", request);
    box.appendChild(el);
  });
  if (!box.tailorClicks && onClick) {
    box.tailorClicks = 1;
    box.addEventListener("click", (ev) => {
      for (let n = ev.target; n && n != box; n = n.parentNode) {
        const id = n.getAttribute && n.getAttribute("data-tailor-item");
        if (id) return onClick(id, n.getAttribute("data-tailor-request"));
      }
    });
  }
  return box;
}
