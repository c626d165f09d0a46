"""Keys, pseudonyms, visitor tokens and API keys: who a request may act for, and what is kept of them."""
