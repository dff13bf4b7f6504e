"""A few threads per event loop for backend I/O, so the commands of a queue
overlap (a page-cache miss on a zvol sleeps while the zvol taskq reads;
fsync sleeps on the ZIL): os.preadv/pwrite/fsync release the GIL.  Completions
come back to the loop thread through a deque and one wakeup byte per batch
(the server's socketpair); handlers then run in the loop as before, so the
sans-IO Queue never sees a thread.  Cf. nvmet's bdev backend: bios submitted,
completed by an interrupt, no ordering between commands (NVMe asks none)."""

import collections
import threading

import queue as _queue

_STOP = object()


class IoPool(object):
    def __init__(self, nthreads, wake):
        self._jobs = _queue.Queue()
        self._done = collections.deque()
        self._wake = wake             # called from a pool thread: must be thread-safe
        self._armed = False
        self._threads = []
        self._nthreads = nthreads

    def submit(self, work, callback):
        """Run work() in a thread; callback(its result) later in the loop."""
        if not self._threads:        # started lazily: never before a worker's fork
            for i in range(self._nthreads):
                t = threading.Thread(target=self._run, name="nvmeof-io-%d" % i)
                t.daemon = True
                t.start()
                self._threads.append(t)
        self._jobs.put((work, callback))

    def _run(self):
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            work, callback = job
            self._done.append((callback, work()))      # work() never raises
            if not self._armed:
                self._armed = True
                self._wake()

    def run_completions(self):
        """In the loop thread: deliver what finished."""
        self._armed = False            # before draining: a late one wakes us again
        done = self._done
        while done:
            callback, res = done.popleft()
            callback(res)

    def close(self):
        """Wait for running I/O (the backends close after this), then deliver."""
        for _ in self._threads:
            self._jobs.put(_STOP)
        for t in self._threads:
            t.join()
        self._threads = []
        self.run_completions()
