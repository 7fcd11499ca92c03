// Decode and validate maintenance-bridge events in Node.js, with the official CloudEvents SDK
// and the published consumer JSON Schema (schemas/v1/event-data.schema.json).
//
// The steps, the same in every language (docs/events.md, "Decoding in any language"):
//  1. Unwrap the delivery: a Pub/Sub message is (attributes, payload bytes); a push request
//     body and the data of an Eventarc messagePublished event both hold it as
//     {"message": {"attributes": {...}, "data": "<base64>"}}.
//  2. Pick the content mode from the content-type attribute (also spelled Content-Type):
//     application/cloudevents... is structured (the payload is the whole event as JSON);
//     anything else is binary (ce-* attributes are the event's attributes, the payload its data).
//     Pub/Sub's ce-* attributes are exactly CloudEvents' HTTP binary headers, so the SDK's
//     HTTP.toEvent reads both modes.
//  3. Validate `data` with the consumer schema: it accepts fields added later within v1.
//  4. Read `sequence` as an int64 that JSON may carry as a number or a decimal string (BigInt).
//  5. Order and deduplicate per (instance id, stream_id, sequence); deduplicate on source + id.
//  6. Verify its origin (origin.js): the VM that signed the event's token is the VM it speaks
//     for, judged at the message's publish time. An unverified event is logged and not acted on
//     unless REQUIRE_ATTESTATION=false.
//
// Run as a script, it reads one delivery per line on stdin and writes one result per line:
//   {"delivery": "pubsub", "attributes": {...}, "data": "<base64 payload>"}
//   {"delivery": "push", "body": {...}}            a Pub/Sub push request body
//   {"delivery": "eventarc", "headers": {...}, "body": "..."}
//                          the HTTP request Eventarc sends (a messagePublished CloudEvent)
// A pulled delivery may carry "publishTime" (RFC 3339); the others carry it in their message.
// Verification follows the environment: ATTESTATION_CERTS_URL (default Google's), the
// system-events function's service account CLOUD_EVENTS_IDENTITY, REQUIRE_ATTESTATION.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const readline = require("node:readline");
const { HTTP } = require("cloudevents");
const Ajv2020 = require("ajv/dist/2020");
const addFormats = require("ajv-formats");
const {
  Certs,
  GOOGLE_CERTS_URL,
  JsonNumber,
  parseExact,
  tokenOf,
  verifyOrigin,
} = require("./origin");

const SCHEMA = path.join(__dirname, "..", "..", "..", "schemas", "v1", "event-data.schema.json");
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

// allowUnionTypes: `sequence` is ["integer", "string"] on purpose (the int64 JSON rule).
const ajv = new Ajv2020({ allErrors: true, allowUnionTypes: true });
addFormats(ajv);
const validateData = ajv.compile(JSON.parse(fs.readFileSync(SCHEMA, "utf8")));

class DecodeError extends Error {}

/** When the message was published (Pub/Sub's publishTime, RFC 3339), or undefined. */
function publishDate(publishTime) {
  if (publishTime === undefined || publishTime === null || publishTime === "") return undefined;
  const when = new Date(publishTime);
  if (typeof publishTime !== "string" || Number.isNaN(when.getTime())) {
    throw new DecodeError(`publishTime ${JSON.stringify(publishTime)} is not a time`);
  }
  return when;
}

/** The structured event as sent, parsed exactly, for origin.js: the SDK's event is not it (it
 * drops empty attributes, rewrites time, and JSON.parse rounds large integers). */
function structuredOf(headers, body, structuredMode) {
  let parsed;
  try {
    parsed = parseExact(body);
  } catch (err) {
    throw new DecodeError(`payload: ${err.message}`);
  }
  if (structuredMode) return parsed;
  const structured = Object.create(null);
  for (const [name, value] of Object.entries(headers)) {
    if (name.startsWith("ce-")) structured[name.slice(3)] = value;
  }
  structured.data = parsed;
  return structured;
}

/** `sequence` as written (the SDK's JSON.parse rounds an int64 beyond 2^53). */
function exactInteger(value) {
  const text = value instanceof JsonNumber ? value.literal : value;
  if (typeof text !== "string" || !/^[0-9]+$/.test(text)) {
    throw new DecodeError("data.sequence is not an integer");
  }
  return BigInt(text);
}

/** A Pub/Sub message: attributes, payload bytes and (optional) publish time, either content
 * mode. */
function decodePubSub(attributes, payload, publishTime) {
  if (attributes === null || typeof attributes !== "object" || Array.isArray(attributes)) {
    throw new DecodeError("message attributes must be a map");
  }
  const headers = {};
  for (const [name, value] of Object.entries(attributes)) {
    if (name.startsWith("ce-")) headers[name] = value;
  }
  const contentType = attributes["content-type"] ?? attributes["Content-Type"];
  if (typeof contentType !== "string") throw new DecodeError("no content-type attribute");
  // Media types are case-insensitive, but the SDK looks its parsers up by the exact string
  // and knows "charset=utf-8" only: the bridge writes "charset=UTF-8" (Google's binding).
  headers["content-type"] = contentType.toLowerCase();
  const body = Buffer.from(payload).toString("utf8");
  let event;
  try {
    event = HTTP.toEvent({ headers, body });
  } catch (err) {
    throw new DecodeError(`not a CloudEvent: ${err.message ?? err}`);
  }
  if (Array.isArray(event)) throw new DecodeError("a batch, not one event");
  if (event.data === null || typeof event.data !== "object") {
    throw new DecodeError("data is not a JSON object");
  }
  if (!validateData(event.data)) {
    throw new DecodeError(`data: ${ajv.errorsText(validateData.errors)}`);
  }
  const data = event.data;
  const structuredMode = headers["content-type"].startsWith("application/cloudevents");
  const structured = structuredOf(headers, body, structuredMode);
  return {
    event,
    structured,
    publishedAt: publishDate(publishTime),
    kind: event.type.split(".").slice(-2).join("."),
    // A number or a decimal string: both read the same.
    sequence: exactInteger(structured.data?.sequence),
    streamKey: `${data.instance.id}/${data.stream_id ?? ""}`, // the order and dedupe scope
  };
}

/** The data of an Eventarc messagePublished event, or a push request body: same shape. */
function decodeMessagePublished(data) {
  const message = data?.message;
  if (message === null || typeof message !== "object") throw new DecodeError("no message object");
  const raw = message.data ?? "";
  if (typeof raw !== "string" || !BASE64.test(raw)) {
    throw new DecodeError("message.data is not base64");
  }
  const publishTime = message.publishTime ?? message.publish_time;
  return decodePubSub(message.attributes ?? {}, Buffer.from(raw, "base64"), publishTime);
}

const MESSAGE_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished";

/** The HTTP request Eventarc delivers (Cloud Run, Cloud Functions): an outer CloudEvent. */
function decodeEventarcRequest(headers, body) {
  let outer;
  try {
    outer = HTTP.toEvent({ headers, body });
  } catch (err) {
    throw new DecodeError(`not a CloudEvent request: ${err.message ?? err}`);
  }
  if (outer.type !== MESSAGE_PUBLISHED) throw new DecodeError(`unexpected type ${outer.type}`);
  return decodeMessagePublished(outer.data);
}

function decodeDelivery(line) {
  const delivery = JSON.parse(line);
  switch (delivery.delivery) {
    case "pubsub":
      return decodePubSub(
        delivery.attributes,
        Buffer.from(delivery.data, "base64"),
        delivery.publishTime,
      );
    case "push":
      return decodeMessagePublished(delivery.body);
    case "eventarc":
      return decodeEventarcRequest(delivery.headers, delivery.body);
    default:
      throw new DecodeError(`unknown delivery ${JSON.stringify(delivery.delivery)}`);
  }
}

/** REQUIRE_ATTESTATION as bridge/origin.py's Policy reads it (default true). */
function requireAttestation(raw = "true") {
  const value = raw.trim().toLowerCase();
  if (["true", "1", "yes", "on"].includes(value)) return true;
  if (["false", "0", "no", "off"].includes(value)) return false;
  throw new Error(`REQUIRE_ATTESTATION must be true or false, not ${JSON.stringify(raw)}`);
}

async function main() {
  const required = requireAttestation(process.env.REQUIRE_ATTESTATION);
  const certs = new Certs(process.env.ATTESTATION_CERTS_URL || GOOGLE_CERTS_URL);
  const cloudIdentity = process.env.CLOUD_EVENTS_IDENTITY ?? "";
  let failed = 0;
  for await (const line of readline.createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    let result;
    try {
      const decoded = decodeDelivery(line);
      const { event, kind, sequence, streamKey } = decoded;
      // Certificates only for a token: an unattested event needs no network.
      const keys = tokenOf(decoded.structured) === null ? {} : await certs.get();
      const verdict = verifyOrigin(decoded, { certs: keys, cloudIdentity });
      const act = verdict.verified || !required;
      if (!verdict.verified) {
        process.stderr.write(
          `unverified origin of ${event.id} (${verdict.reason})${act ? "" : ": not acted on"}\n`,
        );
      }
      result = {
        ok: true,
        id: event.id,
        source: event.source,
        kind,
        stream: streamKey,
        sequence: sequence.toString(),
        verified: verdict.verified,
        attested: verdict.attested,
        reason: verdict.reason,
        act,
      };
    } catch (err) {
      failed += 1;
      result = { ok: false, error: String(err.message ?? err) };
    }
    process.stdout.write(`${JSON.stringify(result)}\n`);
  }
  process.exitCode = failed ? 1 : 0;
}

module.exports = { DecodeError, decodePubSub, decodeMessagePublished, decodeEventarcRequest };

if (require.main === module) main();
