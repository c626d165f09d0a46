"""The `tailor` command end to end on a small synthetic shop: build, report, list, verify, errors."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from index_builder import snapshot
from index_builder.build import BuildConfig, QualityGateError, build, quality_gate
from index_builder.evaluate import Metrics
from tailor.cli import main


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shop")
    assert (
        main(["synth", "--out", str(out), "--users", "300", "--items", "400", "--events", "15000", "--seed", "1"]) == 0
    )
    return out


@pytest.fixture(scope="module")
def built(shop: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("snapshots")
    args = ["build", "--events", str(shop / "events.csv"), "--items", str(shop / "items.jsonl"), "--out", str(root)]
    assert main([*args, "--quiet", "--max-trials", "4"]) == 0
    return root


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("synth", "build", "snapshots"):
        assert command in out


def test_build_publishes_a_verified_snapshot_with_metrics(built: Path) -> None:
    version = snapshot.current_version(built)
    assert version is not None
    assert snapshot.verify(built / version) == []
    manifest = snapshot.load_manifest(built / version)
    assert manifest.quality_gate["passed"] is True
    assert manifest.metrics["model"]["ndcg_at_10"] > manifest.metrics["popularity"]["ndcg_at_10"]
    assert manifest.index["method"] in ("hnsw", "exact")
    assert {"items.json", "item_vectors.npy", "user_vectors.npy", "popular.json"} <= set(manifest.files)
    assert ("items.hnsw" in manifest.files) == (manifest.index["method"] == "hnsw")
    assert len(manifest.inputs) == 2 and all(len(i.sha256) == 64 for i in manifest.inputs)


def test_build_prints_the_quality_report_and_progress(
    shop: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["build", "--events", str(shop / "events.csv"), "--out", str(tmp_path), "--max-trials", "2"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "nDCG@10 lift over popularity" in captured.out
    assert "quality gate passed" in captured.out
    assert "tuning: trial 2/2" in captured.err
    assert "writing snapshot" in captured.err


def test_snapshots_list_marks_the_current_version(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snapshots", "list", "--root", str(built)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"* {snapshot.current_version(built)}")


def test_snapshots_verify_fails_on_a_corrupt_file(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = built.parent / "corrupt"
    copy.mkdir()
    version = snapshot.current_version(built)
    assert version is not None
    (copy / version).mkdir()
    for path in (built / version).iterdir():
        (copy / version / path.name).write_bytes(path.read_bytes())
    snapshot.set_current(copy, version)
    vectors = copy / version / "item_vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-8] + b"\0" * 8)
    assert main(["snapshots", "verify", "--root", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and "item_vectors.npy: sha256 mismatch" in out


def test_missing_input_file_exits_1_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--events", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "s"), "--quiet"]) == 1
    assert "absent.csv: no such file" in capsys.readouterr().err


def test_mostly_garbage_input_exits_1_with_line_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,event,timestamp\nu1,i1,warp,1\nu1,i1\nu2,i2,view,2\n", encoding="utf-8")
    assert main(["build", "--events", str(events), "--out", str(tmp_path / "s"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "line 2: unknown event type 'warp'" in err
    assert "line 3: malformed CSV: expected 4 fields, got 2" in err


def test_rejected_lines_are_reported_when_the_build_proceeds(
    shop: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "events.csv"
    lines = (shop / "events.csv").read_text(encoding="utf-8").splitlines()
    lines.insert(5, "e-bad,u0001,i00001,teleport,2026-01-02T00:00:00Z,,")
    events.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["build", "--events", str(events), "--out", str(tmp_path / "s"), "--quiet", "--max-trials", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "rejected 1," in out
    assert f"e.g. {events}:6: unknown event type 'teleport'" in out


def test_bad_weight_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["build", "--events", "x.csv", "--weight", "purchase"])
    assert exit_info.value.code == 2
    assert "expected EVENT=WEIGHT" in capsys.readouterr().err


def test_report_json_holds_the_manifest_and_rejections(shop: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    args = ["build", "--events", str(shop / "events.csv"), "--out", str(tmp_path / "s"), "--quiet"]
    assert main([*args, "--max-trials", "1", "--report-json", str(report)]) == 0
    decoded = msgspec.json.decode(report.read_bytes())
    assert decoded["manifest"]["version"] == snapshot.current_version(tmp_path / "s")
    assert decoded["reports"][0]["read"] == 15000


def metrics(ndcg: float) -> Metrics:
    return Metrics(ndcg_at_10=ndcg, recall_at_10=0, precision_at_10=0, map_at_10=0, coverage=0, users=1)


def test_quality_gate_refuses_a_model_worse_than_popularity() -> None:
    with pytest.raises(QualityGateError, match=r"0\.1000 < popularity 0\.2000"):
        quality_gate(metrics(0.1), metrics(0.2), force=False)
    assert quality_gate(metrics(0.1), metrics(0.2), force=True) is False
    assert quality_gate(metrics(0.3), metrics(0.2), force=False) is True


def test_quality_gate_refusal_exits_2_and_publishes_nothing(
    shop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Make popularity unbeatable: the gate must then refuse the real build before publishing.
    monkeypatch.setattr("index_builder.build.evaluate_shipped", lambda *args, **kwargs: metrics(0.0))
    root = tmp_path / "s"
    assert (
        main(["build", "--events", str(shop / "events.csv"), "--out", str(root), "--quiet", "--max-trials", "1"]) == 2
    )
    assert "not published" in capsys.readouterr().err
    assert snapshot.current_version(root) is None and snapshot.list_versions(root) == []


def test_above_the_list_limit_a_build_ships_a_similar_items_index_instead(shop: Path, tmp_path: Path) -> None:
    config = BuildConfig(
        events=[shop / "events.csv"], items=shop / "items.jsonl", out=tmp_path, max_trials=2, neighbours_max_items=100
    )
    build(config, lambda _: None)
    manifest = snapshot.load_manifest(tmp_path / str(snapshot.current_version(tmp_path)))
    assert "neighbour_rows.npy" not in manifest.files
    similar = manifest.similar_index
    assert similar["method"] in ("hnsw", "exact") and similar["recall_at_10"] >= 0.95
    assert ("similar.hnsw" in manifest.files) == (similar["method"] == "hnsw")
    assert len(similar["trials"]) > 0


def test_a_build_that_fails_while_writing_leaves_no_staging_directory(
    shop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    # The item graph is already written to the staging directory when similar items are computed.
    monkeypatch.setattr("index_builder.build.similar_items", broken)
    config = BuildConfig(events=[shop / "events.csv"], items=shop / "items.jsonl", out=tmp_path, max_trials=1)
    with pytest.raises(OSError, match="disk full"):
        build(config, lambda _: None)
    assert list(tmp_path.iterdir()) == []
