"""``tracewire stats``: trace rows from the store or the Delta table (sources.py), one
aggregation (aggregate.py), and its renderings (render.py: table, JSON, CSV; html.py: a page)."""
