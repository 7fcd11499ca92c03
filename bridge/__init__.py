"""maintenance-bridge: Compute Engine maintenance notices as CloudEvents on Pub/Sub.

Kept import-free so that subscribers (the example Cloud Functions) can vendor `bridge.events`
without pulling in the daemon's dependencies.
"""

__version__ = "0.2.0"
