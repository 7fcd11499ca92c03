"""A local GCE metadata server to test maintenance watchers and their subscribers offline.

Compute Engine has no offline way to rehearse a host-maintenance notice, so this module
serves the metadata API the way the real server behaves (header rules, content-derived
ETags, ``wait_for_change`` long polls, ``recursive``/``alt`` rendering, the 503 of an
empty ``upcoming-maintenance``) and adds what the real one cannot: a control API to
change values, inject faults and play scenarios. Stdlib only, so it runs anywhere (the
identity endpoint signs its tokens with google-auth, a dependency of the bridge anyway).

Where the real server's behaviour is undocumented, a switch picks the variant so that a client
can be tested against each: ``plain_alt_json`` renders a plain value under ``alt=json`` as a
JSON string (``"NONE"``) or as raw text (``NONE``); ``scheduling`` makes
``instance/scheduling/?recursive=true`` answer its JSON object (or the same with its flags as
JSON booleans, or with its keys as the paths spell them), a text listing, a 404 or a
truncated JSON body; ``empty_upcoming`` makes an empty ``upcoming-maintenance`` answer the
"no notifications" 503 or a 404. Every "nothing scheduled" form users report can be served:
store ``NONE`` (read as ``"NONE"`` or raw ``NONE`` under ``alt=json``, per ``plain_alt_json``),
``{}`` or ``{ }``, or delete the value.

Point a client at it with ``GCE_METADATA_HOST=<Simulator.host_port>``. The control API
lives on the same port under ``/simulator/v1/`` (no ``Metadata-Flavor`` needed):
``PUT|GET|DELETE values/<path>``, ``POST|DELETE faults``, ``GET stats``,
``POST scenario`` with ``{"name": ..., "speed": ...}`` or ``{"steps": [...]}``,
``POST forget`` (drop every connection with a reset, unanswered), ``POST|DELETE freeze``
(take requests and never answer them; the polls hanging at the time too), ``POST settings``
with ``{"plain_alt_json": ..., "scheduling": ..., "empty_upcoming": "503"|"404"}``,
``GET identity/certs`` (the key that signs the ID tokens of
``instance/service-accounts/default/identity``, see `identity`), ``POST identity`` with
``{"lifetime": seconds}``.

Scenarios (times in seconds at speed 1; ``speed`` divides them). Each first sets the
state it starts from at t=0 so that it can loop:

- ``migrate``: live migration. ``on-host-maintenance=MIGRATE``; ``maintenance-event``
  goes ``MIGRATE_ON_HOST_MAINTENANCE`` at 1 (the 60 s notice) and back to ``NONE`` at 61
  when the migration is over.
- ``terminate``: a GPU VM (``on-host-maintenance=TERMINATE``) gets
  ``TERMINATE_ON_HOST_MAINTENANCE`` at 1, the 60 minute notice, held until 3601, ``NONE``.
- ``preempt``: a Spot VM (``preemptible=TRUE``, ``provisioning-model=SPOT``); ``preempted``
  turns ``TRUE`` at 1, power-off comes 30 s later and the restarted VM reads ``FALSE`` at 31.
- ``upcoming``: ``upcoming-maintenance`` is empty (503) at 0, a SCHEDULED, reschedulable,
  PENDING window for 2030-01-15 02:00-06:00 UTC appears at 1, is moved by the user to
  2030-01-20 at 5, and is gone again (503) at 10.

The package: `state` (the state model and how it renders a GET), `handler` (HTTP), `wire`
(paths, bodies, replies), `identity` (ID tokens), `scenarios` and `serve` (the foreground
command).
"""

from bridge.simulator.handler import _Handler
from bridge.simulator.scenarios import SCENARIOS, Step, load_scenario, sample_window
from bridge.simulator.serve import open_simulator, serve
from bridge.simulator.state import (
    DEFAULT_IDENTITY,
    EMPTY_UPCOMING,
    PLAIN_ALT_JSON,
    SCHEDULING_MODES,
    Simulator,
)
from bridge.simulator.wire import NO_NOTIFICATION

__all__ = [
    "DEFAULT_IDENTITY",
    "EMPTY_UPCOMING",
    "NO_NOTIFICATION",
    "PLAIN_ALT_JSON",
    "SCENARIOS",
    "SCHEDULING_MODES",
    "Simulator",
    "Step",
    "_Handler",
    "load_scenario",
    "open_simulator",
    "sample_window",
    "serve",
]
