"""Service proxy: picks which replica serves each connection or request."""
