"""Schemathesis hooks for tests/ops (loaded through SCHEMATHESIS_HOOKS by ops.py hostile).

`no_server_error` replaces the built-in `not_a_server_error` (run.sh excludes that one) with the
same rule and one documented exception: a 504 from POST /generate is the answer the API promises
when the request's *own* `timeout_secs` passed before its images were finished (openapi.yaml:
"Deadline"). Schemathesis draws `timeout_secs` from its minimum (0.1 s) up, so it sends deadlines
shorter than the work it asks for. The exception holds only when the body set
`timeout_secs`, the client waited at least that long, and the error is a `timeout_error`; any
other 5xx fails. Every response checked is also appended to $OPS_ST_LOG (operation, status,
and for 504s the deadline asked for) so ops.py can report status counts.
"""

import json
import os

import schemathesis

_LOG = os.environ.get("OPS_ST_LOG")


def _log(entry):
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")


@schemathesis.check
def no_server_error(ctx, response, case):
    """5xx fails, except a 504 on POST /generate for a request whose own deadline passed."""
    status = response.status_code
    op = f"{case.method.upper()} {case.path}"
    entry = {"op": op, "status": status}
    if status >= 500:
        body = case.body if isinstance(case.body, dict) else {}
        t = body.get("timeout_secs")
        own_deadline = (
            status == 504
            and case.method.upper() == "POST"
            and case.path == "/generate"
            and isinstance(t, (int, float))
            and not isinstance(t, bool)
            and response.elapsed >= t
        )
        error_type = None
        try:
            error_type = json.loads(response.content)["error"]["type"]
        except Exception:
            pass
        entry.update(timeout_secs=t, error_type=error_type, elapsed=response.elapsed)
        _log(entry)
        if not (own_deadline and error_type == "timeout_error"):
            raise AssertionError(
                f"Server error {status} for {op} (body {json.dumps(case.body)[:300]}): "
                f"{response.content[:300]!r}"
            )
        return None
    _log(entry)
    return None
