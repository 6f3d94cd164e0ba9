"""Send a user's thumbs up or down on one reply of a running app, by the reply's request id.

    python feedback_client.py REQUEST_ID down --comment "wrong city" [--app http://127.0.0.1:8000]

The request id is the ``X-Request-ID`` header tracewire's middleware puts on every response
(a web or mobile client keeps it next to the reply it shows). The app must serve the
middleware's feedback route (``TracingMiddleware(app, feedback_path="/feedback")``, as
examples/fastapi_agent does): the feedback lands on that request's trace in MLflow, even when
it arrives before the trace is stored. It lands only if this request may give feedback on that
trace: ``--user`` sends ``X-User-ID``, which examples/fastapi_agent trusts (as an app behind a
gateway would), and a reply of user ``ada`` takes feedback only from ``ada``.
"""

from __future__ import annotations

import argparse
import sys

import httpx


def send_feedback(
    app: str, request_id: str, thumbs_up: bool, comment: str | None = None, user: str | None = None
) -> httpx.Response:
    body = {"request_id": request_id, "name": "thumbs", "value": thumbs_up}
    if comment:
        body["rationale"] = comment
    headers = {"X-User-ID": user} if user else {}
    return httpx.post(f"{app.rstrip('/')}/feedback", json=body, headers=headers, timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("request_id", help="the X-Request-ID of the reply")
    parser.add_argument("thumbs", choices=["up", "down"])
    parser.add_argument("--comment", help="why (the feedback's rationale)")
    parser.add_argument("--user", help="who gives it (sent as X-User-ID)")
    parser.add_argument("--app", default="http://127.0.0.1:8000", help="the app's base URL")
    args = parser.parse_args()
    response = send_feedback(
        args.app, args.request_id, args.thumbs == "up", args.comment, args.user
    )
    # 202: accepted (stored on the trace, or waiting for it); anything else says what is wrong.
    print(response.status_code, response.text)
    return 0 if response.status_code == 202 else 1


if __name__ == "__main__":
    sys.exit(main())
