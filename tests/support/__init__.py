"""The one harness shared by the test suite and the benchmarks (bench/ imports it as
`tests.support`, the tests as `support`): change it for both.

- `harness`: waiting on a condition (never a guessed sleep), ports, events, the bridge
  in-process (`bridge.daemon.run` on a thread, with the test's own sink);
- `bridge`: the bridge as a real `maintenance-bridge run` subprocess;
- `memory_sink`: an in-memory sink that records every send and can hold or fail them;
- `pubsub`, `gcloud`, `fake_pubsub`: the official Pub/Sub and Firestore emulators, found
  through the Cloud SDK, and the fake used only by tests named `..._on_fake`;
- `provider_schema`: the Google provider's schema, read from the npm package.
"""
