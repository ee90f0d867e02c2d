"""Intent routing and the semantic FAQ cache (never imports ``gateway``)."""
