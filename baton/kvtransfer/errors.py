"""The one exception a transfer's users see: `TransferFailed`, with a reason people can read."""


class TransferFailed(Exception):
    """A KV transfer did not complete whole. Nothing it delivered may be used.

    `reason` is one line naming what went wrong (deadline, cancel, lost connection, ...).
    """

    def __init__(self, request_id: str, reason: str):
        super().__init__(f"KV transfer of request {request_id} failed: {reason}")
        self.request_id = request_id
        self.reason = reason
