"""`forge serve`: read-only web pages over the registry (runner/web/app.py: the routes;
pages.py: what each page shows; templates/ and static/: the HTML and its one stylesheet)."""
