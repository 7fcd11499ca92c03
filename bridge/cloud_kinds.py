"""The kinds of the cloud's events: what Compute Engine's system-event log can say of a VM.

A bridge knows only what its own VM's metadata server tells it while it runs; the cloud writes
every disruption to Cloud Logging as a System Event audit log entry, whatever the VM saw. The
function `system-events` turns each entry into an event of the same contract, with one of the
kinds declared here (`bridge.system_events` does the converting). Declared apart from the
converter, and from the standard library only, so that the decoder (`bridge.events`) accepts
them without importing the converter, and the example Cloud Functions vendor both.
"""

from __future__ import annotations

from collections.abc import Mapping

CLOUD_KEY = "cloud/system-event"  # the `key` of every cloud event: no metadata key is watched
CLOUD_ORIGIN = "cloud"  # `data.origin` of a cloud event; absent on a bridge's events

# What a sink routes here: the log, the resource type and the service of the entries.
SYSTEM_EVENT_LOG = "cloudaudit.googleapis.com/system_event"
RESOURCE_TYPE = "gce_instance"
SERVICE = "compute.googleapis.com"

# The method of a maintenance window's entries; its kind depends on the entry (a window given,
# moved, or completed), see `bridge.system_events.upcoming_kind`.
UPCOMING_METHOD = "compute.instances.upcomingMaintenance"
UPCOMING_SCHEDULED = "cloud.maintenance_scheduled"
UPCOMING_UPDATED = "cloud.maintenance_updated"
UPCOMING_COMPLETED = "cloud.maintenance_completed"
# Any other method of the log: passed on under this kind, never dropped (Google adds methods).
GENERIC_KIND = "cloud.system_event"

# methodName -> kind, for the methods whose entry always means the same thing.
METHODS: Mapping[str, str] = {
    "compute.instances.hostError": "cloud.host_error",
    "compute.instances.automaticRestart": "cloud.automatic_restart",
    "compute.instances.preempted": "cloud.preempted",
    "compute.instances.migrateOnHostMaintenance": "cloud.migrated",
    "compute.instances.terminateOnHostMaintenance": "cloud.terminated_for_maintenance",
    "compute.instances.guestTerminate": "cloud.guest_terminated",
    "compute.instances.instanceManagerHaltForRestart": "cloud.halted_for_restart",
    "compute.instances.repair.recreateInstance": "cloud.recreated",
}

# Every kind a cloud event may have, in a fixed order (schemas, goldens, Terraform's list).
CLOUD_KINDS: tuple[str, ...] = (
    *METHODS.values(),
    UPCOMING_SCHEDULED,
    UPCOMING_UPDATED,
    UPCOMING_COMPLETED,
    GENERIC_KIND,
)
# The kinds that say the VM was disrupted now (stopped, restarted or moved): what the ledger
# counts as a disruption the cloud confirms, and the board lists.
DISRUPTION_KINDS: frozenset[str] = frozenset(METHODS.values())
