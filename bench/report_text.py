"""The static prose of docs/benchmarks.md: what changed between the A/B sides, and the history
of earlier changes (their figures come from A/B runs of their day, and say so)."""

# Earlier changes: static text, whose figures come from A/B runs of their day and say so.
HISTORY = """#### Earlier (history: interleaved A/B runs of 2026-11-25, not this run)

- **The thread hand-off before the first send** (bridge/relay.py). The relay thread used to
  send every event, so each one waited for that thread to be woken and scheduled: 0.7-0.8 ms
  p50 on the development machine (2 busy cores), the "queued -> sink.send called" stage. Now
  the thread that records an event sends it at once when nothing is queued or in flight; the
  relay thread still awaits the acknowledgement, retires events in order and owns every
  retry. 300 changes each: change -> stdout line written p50 2.69 -> 1.67 ms, p99 9.77 ->
  7.90 ms; change -> Pub/Sub ack p50 10.81 -> 9.36 ms; the stage itself 0.75 -> 0.01 ms.
- **The Pub/Sub batching delay** (`--publish-latency`, default 0.0005 s -> 0). One event at a
  time gains nothing from waiting for a batch, and batches still form behind a publish in
  flight (one per ordering key). 395 publishes each: round trip p50 8.52 -> 8.39 ms, p99
  15.75 -> 15.15 ms (small next to the emulator's own round trip, which dominates)."""
CHANGES = """What changed between the two (the figures above measure it):

- **The metadata client speaks HTTP/1.1 itself** (bridge/http1.py, bridge/metadata.py), not
  through requests or urllib3: one request per change, and their per-request work (hooks,
  header merging, URL parsing, header parsing through the `email` package, response wrapping)
  cost more CPU than the rest of handling the event. What is accepted is unchanged (flavor
  header, no redirect, capped headers and body, the same failure classes); every framing a
  server may use is read (Content-Length, chunked, read to the close, interim 1xx).
- **No retry machinery on a round that succeeds** (bridge/watcher.py): the long-poll is asked
  directly; only a failure enters the retry loop, which continues the same schedule.
- **Kept, since issue 21: one thread sends and retires** (bridge/relay.py): the recording
  thread hands each event to the relay thread, which alone calls the sink, so a sink blocked
  in `send` never stops recording. The hand-off is a Condition notify, and the recording
  thread then pauses (2 ms at most) until the relay thread has called send, so that the woken
  thread does not wait for the GIL behind the log line, the hooks and the next long-poll:
  measured A/B against the inline send it replaced (two bridges on one simulator, 300
  changes, four rounds), +0.27 ms p50 change -> line, and +0.6 ms without the pause.
- **Less work per event**: one serialisation (the store, the stdout sink and hooks write the
  same bytes); a retirement is committed without an fsync of its own (the next record's
  commit syncs it; lost to a power cut, the event is only sent again, under its id); the
  outbox bound is kept in memory instead of a scan of the outbox per record; timestamps
  formatted without strftime; log records without caller, thread and process lookups.
- **Nothing slow before the watch** (bridge/daemon.py, bridge/sinks/): the Pub/Sub client
  is imported and connected in the background once every key has had its first answer; an
  event recorded meanwhile waits for it (and in the outbox), as during a Pub/Sub outage.
- **A retry schedule shaped for the metadata server** (bridge/retry.py): quick and steady
  first, back-off only after (see the recovery section).
- **The write-ahead log's length set at start** (bridge/store.py): a commit that lengthens
  the file has fdatasync journal the new length too, a second device flush; the log is made
  long enough at start and checkpointed every 16 retirements, so no recorded change's commit
  lengthens it.
- **Not the bridge: the simulator** now wakes only the hanging polls on the key that changed
  (and on the directories above it), as a real server answers them. It used to wake every
  poll of every key, and a bridge watches three: each change waited behind the simulator
  answering polls that had nothing to answer. Both sides of this A/B, the sample and the
  poller all run on the same simulator.
- **Kept: the durable commit** (SQLite WAL, synchronous=FULL) before anything is published:
  a recorded notice must survive a power loss and keep its id. Its cost is the machine's
  fsync, shown in the floor table; on a busy disk it is the largest part of the stdout
  path."""
