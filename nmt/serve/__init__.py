"""``nmt serve``: trained models behind HTTP, in one process, each loaded once.

``text`` cuts what clients send into segments, ``models`` loads the runs (or CTranslate2
exports) to serve, ``batcher`` gathers concurrent requests into shared batches decoded in
one worker thread, ``app`` holds the routes (LibreTranslate's API, OpenNMT-py's route, the
page at ``/``). ``run.serve`` starts uvicorn: SIGTERM (or Ctrl-C) stops accepting connections,
lets the requests in flight finish and exits 0.
"""

