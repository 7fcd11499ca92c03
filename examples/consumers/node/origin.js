// Verified origin (docs/events.md, "Verified origin"; the contract is bridge/origin.py): check
// that the VM which signed an event's identity token is the VM the event speaks for, with
// node:crypto only.
//
// - The token travels in the extensions attestation1, attestation2, ... (pieces joined in
//   order); none: the event is unattested.
// - Its audience is "maintenance-bridge:v1:" + the hex SHA-256 of the canonical JSON of the
//   structured event without its attestation* members and datacontenttype. Canonical is what
//   Python's json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True) writes, so
//   the event is parsed here with parseExact: JSON.parse would round integers beyond 2^53 and
//   forget whether a number was written 1 or 1.0, and Python's digest depends on both.
// - The token is Google-signed (RS256 under the certificate of its kid), issued by Google, and
//   valid, within 300 s of skew, when the message was published (a redelivery hours later
//   still verifies).
// - A bridge's event is signed by its own VM (the token's google.compute_engine instance_id,
//   project_id and zone equal the event's extensions and data.instance); a cloud event
//   (data.origin "cloud") by the system-events function's service account (the token's email).
"use strict";

const crypto = require("node:crypto");

const AUDIENCE_PREFIX = "maintenance-bridge:v1:";
const GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs";
const ISSUERS = new Set(["https://accounts.google.com", "accounts.google.com"]);
const SKEW = 300; // seconds the publish time may lie outside [iat, exp] (hosts' clocks)
const PIECE = /^attestation([1-9][0-9]*)$/;
const BASE64URL = /^[A-Za-z0-9_-]*$/;

/** The token does not prove the event's origin; the message says which check failed. */
class Forged extends Error {}

/** A JSON number as written, so that canonical() renders it as Python would. */
class JsonNumber {
  constructor(literal) {
    this.literal = literal;
  }
}

const NUMBER = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;
const STRING = /"(?:[^"\\]|\\[\s\S])*"/y; // JSON.parse then checks escapes and control chars
const WHITESPACE = /[ \t\n\r]*/y;

/** JSON text parsed exactly: numbers as JsonNumber, objects without a prototype (a member
 * named __proto__ is a member). */
function parseExact(text) {
  let pos = 0;
  const match = (pattern) => {
    pattern.lastIndex = pos;
    const found = pattern.exec(text);
    if (found) pos = pattern.lastIndex;
    return found?.[0];
  };
  const expect = (char) => {
    match(WHITESPACE);
    if (text[pos] !== char) throw new SyntaxError(`expected ${char} at ${pos}`);
    pos += 1;
  };
  const value = () => {
    match(WHITESPACE);
    const char = text[pos];
    if (char === "{") {
      pos += 1;
      const object = Object.create(null);
      match(WHITESPACE);
      if (text[pos] === "}") {
        pos += 1;
        return object;
      }
      do {
        match(WHITESPACE);
        const key = match(STRING);
        if (key === undefined) throw new SyntaxError(`expected a member name at ${pos}`);
        expect(":");
        object[JSON.parse(key)] = value();
        match(WHITESPACE);
      } while (text[pos] === "," && ++pos);
      expect("}");
      return object;
    }
    if (char === "[") {
      pos += 1;
      const array = [];
      match(WHITESPACE);
      if (text[pos] === "]") {
        pos += 1;
        return array;
      }
      do {
        array.push(value());
        match(WHITESPACE);
      } while (text[pos] === "," && ++pos);
      expect("]");
      return array;
    }
    if (char === '"') return JSON.parse(match(STRING) ?? text.slice(pos));
    for (const [word, literal] of [
      ["true", true],
      ["false", false],
      ["null", null],
    ]) {
      if (text.startsWith(word, pos)) {
        pos += word.length;
        return literal;
      }
    }
    const number = match(NUMBER);
    if (number === undefined) throw new SyntaxError(`unexpected ${char ?? "end"} at ${pos}`);
    return new JsonNumber(number);
  };
  const parsed = value();
  match(WHITESPACE);
  if (pos !== text.length) throw new SyntaxError(`unexpected data at ${pos}`);
  return parsed;
}

/** Python's repr of a double: shortest digits, exponent form below 1e-4 or from 1e16. */
function pythonFloat(x) {
  if (!Number.isFinite(x)) return x > 0 ? "Infinity" : "-Infinity";
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const [mantissa, exponent] = Math.abs(x).toExponential().split("e");
  const digits = mantissa.replace(".", "");
  const point = Number(exponent) + 1; // digits[0..point) before the decimal point
  let text;
  if (point <= -4 || point > 16) {
    const e = point - 1;
    const fraction = digits.length > 1 ? `.${digits.slice(1)}` : "";
    text = `${digits[0]}${fraction}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
  } else if (point <= 0) {
    text = `0.${"0".repeat(-point)}${digits}`;
  } else if (point >= digits.length) {
    text = `${digits}${"0".repeat(point - digits.length)}.0`;
  } else {
    text = `${digits.slice(0, point)}.${digits.slice(point)}`;
  }
  return x < 0 ? `-${text}` : text;
}

/** A JSON string as ensure_ascii writes it: JSON.stringify's escapes (the same short forms and
 * lowercase \u00XX), then every UTF-16 unit outside printable ASCII as \uXXXX, which writes an
 * astral character as its surrogate pair, as Python does. */
function pythonString(text) {
  return JSON.stringify(text).replace(
    /[^\x20-\x7e]/g,
    (unit) => `\\u${unit.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

/** Python sorts keys by code point; JavaScript's default sort is by UTF-16 unit, which puts
 * an astral character before U+E000..U+FFFF. */
function byCodePoint(a, b) {
  const x = Array.from(a);
  const y = Array.from(b);
  for (let i = 0; i < Math.min(x.length, y.length); i += 1) {
    const d = x[i].codePointAt(0) - y[i].codePointAt(0);
    if (d !== 0) return d;
  }
  return x.length - y.length;
}

/** The canonical JSON of a parseExact value, as bridge/origin.py's canonical() writes it. */
function canonical(value) {
  if (value === null || value === true || value === false) return String(value);
  if (typeof value === "string") return pythonString(value);
  if (value instanceof JsonNumber) {
    return /^-?[0-9]+$/.test(value.literal)
      ? BigInt(value.literal).toString() // Python's int: exact, and -0 is 0
      : pythonFloat(Number(value.literal));
  }
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (typeof value === "object") {
    const members = Object.keys(value)
      .sort(byCodePoint)
      .map((key) => `${pythonString(key)}:${canonical(value[key])}`);
    return `{${members.join(",")}}`;
  }
  throw new TypeError(`not a parseExact value: ${typeof value}`);
}

/** The audience a token for this structured event (a parseExact object) must carry. */
function bindingOf(structured) {
  const signed = Object.create(null);
  for (const [name, value] of Object.entries(structured)) {
    if (name !== "datacontenttype" && !PIECE.test(name)) signed[name] = value;
  }
  return AUDIENCE_PREFIX + crypto.createHash("sha256").update(canonical(signed)).digest("hex");
}

/** The token the event carries, its pieces joined by number (attestation10 after
 * attestation9); null when unattested. Pieces that do not run 1..N make a malformed token. */
function tokenOf(structured) {
  const pieces = new Map();
  for (const [name, value] of Object.entries(structured)) {
    const found = PIECE.exec(name);
    if (found) pieces.set(Number(found[1]), value);
  }
  if (pieces.size === 0) return null;
  const parts = [];
  for (let n = 1; n <= pieces.size; n += 1) {
    if (typeof pieces.get(n) !== "string") return "."; // a gap or a non-string piece
    parts.push(pieces.get(n));
  }
  return parts.join("");
}

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function decodePart(part) {
  return Buffer.from(part, "base64url");
}

/** The token's claims if it is Google-signed, bound to `audience` and valid at `at` (epoch
 * seconds, when the message was published); else throws Forged. */
function verifyToken(token, { audience, at, certs }) {
  const parts = token.split(".");
  if (parts.length !== 3 || !parts.every((part) => BASE64URL.test(part))) {
    throw new Forged("malformed token");
  }
  let header;
  let claims;
  try {
    header = JSON.parse(decodePart(parts[0]).toString("utf8"));
    claims = JSON.parse(decodePart(parts[1]).toString("utf8"));
  } catch (err) {
    throw new Forged(`malformed token: ${err.message}`);
  }
  if (!isObject(header) || !isObject(claims)) {
    throw new Forged("malformed token: header or claims not an object");
  }
  if (header.alg !== "RS256") {
    throw new Forged(`algorithm ${JSON.stringify(header.alg)} is not RS256`);
  }
  const kid = String(header.kid);
  if (!Object.hasOwn(certs, kid)) throw new Forged(`unknown key id ${JSON.stringify(header.kid)}`);
  let key;
  try {
    key = new crypto.X509Certificate(certs[kid]).publicKey;
  } catch (err) {
    throw new Forged(`the certificate of key id ${kid} is unreadable: ${err.message}`);
  }
  if (key.asymmetricKeyType !== "rsa") throw new Forged(`key id ${kid} is not an RSA key`);
  const signed = Buffer.from(`${parts[0]}.${parts[1]}`, "ascii");
  if (!crypto.verify("sha256", signed, key, decodePart(parts[2]))) {
    throw new Forged("signature does not verify");
  }
  if (!ISSUERS.has(claims.iss)) throw new Forged(`issuer ${JSON.stringify(claims.iss)}`);
  if (claims.aud !== audience) throw new Forged("audience does not bind this event");
  if (!Number.isInteger(claims.iat) || !Number.isInteger(claims.exp)) {
    throw new Forged("token has no iat/exp");
  }
  if (!(claims.iat - SKEW <= at && at <= claims.exp + SKEW)) {
    throw new Forged("token was not valid when the event was published");
  }
  return claims;
}

/** Throws Forged unless the token's owner may speak for the event: its VM for a bridge's
 * event, the system-events function's service account (`cloudIdentity`) for a cloud event. */
function vouchesFor(claims, structured, cloudIdentity) {
  const data = structured.data;
  if (data?.origin === "cloud") {
    if (!cloudIdentity) {
      throw new Forged("a cloud event, and no cloud identity is configured to check it by");
    }
    if (claims.email !== cloudIdentity || claims.email_verified !== true) {
      const [signer, wanted] = [claims.email, cloudIdentity].map((v) => JSON.stringify(v));
      throw new Forged(`cloud event signed by ${signer}, not ${wanted}`);
    }
    return;
  }
  const compute = claims.google?.compute_engine;
  if (!isObject(compute)) {
    throw new Forged("token has no compute_engine claims (not a VM's format=full token)");
  }
  const instance = data?.instance ?? {};
  for (const [claim, values] of [
    ["instance_id", [structured.instanceid, instance.id]],
    ["project_id", [structured.project, instance.project_id]],
    ["zone", [structured.zone, instance.zone]],
  ]) {
    const signed = compute[claim];
    for (const value of values) {
      if (typeof signed !== "string" || value !== signed) {
        const [token, event] = [signed, value].map((v) => JSON.stringify(v));
        throw new Forged(`token of ${claim} ${token}, event of ${event}`);
      }
    }
  }
}

/** The origin verdict of a decoded event ({structured, publishedAt}, as consumer.js's decoders
 * return it): {verified, attested, reason}. Never throws for a bad token (that is the verdict).
 * `publishedAt` (a Date) defaults to the message's publish time, else to now (an HTTP POST is
 * judged when received); `certs` is {kid: PEM} (Certs.get()), needed only for an attested
 * event; `cloudIdentity` the system-events function's service account email. */
function verifyOrigin(decoded, { certs = {}, publishedAt, cloudIdentity = "" } = {}) {
  const { structured } = decoded;
  const token = tokenOf(structured);
  if (token === null) return { verified: false, attested: false, reason: "unattested" };
  const when = publishedAt ?? decoded.publishedAt ?? new Date();
  try {
    const audience = bindingOf(structured);
    const claims = verifyToken(token, { audience, at: when.getTime() / 1000, certs });
    vouchesFor(claims, structured, cloudIdentity);
  } catch (err) {
    if (!(err instanceof Forged)) throw err;
    return { verified: false, attested: true, reason: err.message };
  }
  return { verified: true, attested: true, reason: "" };
}

/** Google's signing certificates from `url`, fetched on first use and kept `ttlSeconds` (they
 * rotate over days; a fetch per message would add a round trip to every event). A failed fetch
 * rejects: a retryable error (nack), not a forgery. */
class Certs {
  constructor(url = GOOGLE_CERTS_URL, ttlSeconds = 3600) {
    this.url = url;
    this.ttlMs = ttlSeconds * 1000;
    this.pending = null;
    this.fetchedAt = -Infinity;
  }

  get() {
    if (this.pending === null || Date.now() - this.fetchedAt > this.ttlMs) {
      this.fetchedAt = Date.now();
      const pending = fetch(this.url).then(async (reply) => {
        if (!reply.ok) throw new Error(`certificates: HTTP ${reply.status} from ${this.url}`);
        return reply.json();
      });
      pending.catch(() => {
        if (this.pending === pending) this.pending = null; // the next call fetches again
      });
      this.pending = pending;
    }
    return this.pending;
  }
}

module.exports = {
  AUDIENCE_PREFIX,
  GOOGLE_CERTS_URL,
  Certs,
  JsonNumber,
  bindingOf,
  canonical,
  parseExact,
  tokenOf,
  verifyOrigin,
};
