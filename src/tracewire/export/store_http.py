"""MLflow's HTTP calls made while shipping, with our retry budget (runs only in the shipper
process, and in the CLI commands that ship).

MLflow's REST client retries 7 times with 120 s timeouts; while shipping, each call makes one
attempt with our timeout (the shipper retries with backoff), follows no redirect, and records
what the tracking server answered (its HTTP status, Retry-After) for export/store.py to read
after a failure. An answer that cannot be MLflow's (a redirect, a proxy's HTML page) raises
:class:`StoreAnswerError`. Outside the shipping block, MLflow's call is unchanged.

MLflow internals used (pinned in tests/export/test_mlflow_pins.py): ``rest_utils.http_request``
as the REST store calls it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tracewire.core import scrub

_original_http_request = None
# On the shipper's thread while it ships: the timeout of each request, and what the last
# answer said (its HTTP status, Retry-After in seconds), read by export/store.py after a failure.
shipping = threading.local()
_RETRY_AFTER_CAP = 300.0  # seconds: a server asking for more is asked again after this
# What a tracking server answers with: JSON for REST calls, protobuf for OTLP spans. A 2xx of
# another type (a proxy's HTML page), or of none (an answer cut off in its headers), is not an
# acknowledgement. Its /version answer is the one exception (MLflow serves it as text/html).
_ANSWER_TYPES = ("application/json", "application/x-protobuf")
_VERSION_ENDPOINT = "/version"


class StoreAnswerError(RuntimeError):
    """The store's HTTP answer cannot be an acknowledgement (a redirect, a page that is not
    MLflow's, a different trace id): retried like an outage, never taken for a write."""


def http_request(*args: Any, **kwargs: Any) -> Any:
    """MLflow's HTTP call, with our retry budget on the shipper's thread: one attempt and our
    timeout (the shipper retries with backoff), instead of 7 retries x 120 s. The answer comes
    back whatever its status (MLflow turns an error status into its own exception after), so
    the real status and Retry-After are recorded; redirects are not followed."""
    if getattr(shipping, "timeout", None) is None:
        return _original_http_request(*args, **kwargs)  # type: ignore[misc]
    kwargs.update(
        max_retries=0, timeout=shipping.timeout, raise_on_status=False, allow_redirects=False
    )
    shipping.status = shipping.retry_after = None
    response = _original_http_request(*args, **kwargs)  # type: ignore[misc]
    shipping.status = response.status_code
    shipping.retry_after = _retry_after(response.headers.get("Retry-After"))
    if 300 <= response.status_code < 400:
        raise StoreAnswerError(
            f"the tracking server redirected ({response.status_code}) to "
            f"{scrub.text(response.headers.get('Location', '?'))}"
        )
    kind = response.headers.get("Content-Type", "").split(";")[0].strip()
    endpoint = kwargs.get("endpoint", args[1] if len(args) > 1 else None)
    if response.status_code < 300 and kind not in _ANSWER_TYPES and endpoint != _VERSION_ENDPOINT:
        raise StoreAnswerError(
            f"the tracking server answered {response.status_code} with "
            f"{kind or 'no content type'}, not MLflow's answer"
        )
    return response


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number, or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        import email.utils

        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP)


def install_http_budget() -> None:
    """In the shipper process: MLflow's REST calls made while shipping get our retry budget."""
    global _original_http_request
    from mlflow.utils import rest_utils

    if _original_http_request is not None:
        return
    _original_http_request = rest_utils.http_request
    rest_utils.http_request = http_request
    try:
        from mlflow.store.tracking import rest_store
    except ImportError:
        return
    rest_store.http_request = http_request
