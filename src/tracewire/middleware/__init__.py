"""Web request tracing for any ASGI app (FastAPI, Starlette, ...):

app.add_middleware(tracewire.middleware.TracingMiddleware)
app = tracewire.middleware.TracingMiddleware(app)   # outermost: ids on unhandled 500s too
"""

from tracewire.middleware.asgi import TracingMiddleware

__all__ = ["TracingMiddleware"]
