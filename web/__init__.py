"""Flask app factory (filled by the web issue)."""
