from tests.support.web_server import server  # noqa: F401  (fixture)
