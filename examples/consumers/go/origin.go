package main

// Verified origin (docs/events.md, "Verified origin"; the contract is bridge/origin.py): check
// that the VM which signed an event's identity token is the VM the event speaks for, with the
// standard library only.
//
//   - The token travels in the extensions attestation1, attestation2, ... (pieces joined in
//     order); none: the event is unattested.
//   - Its audience is "maintenance-bridge:v1:" + the hex SHA-256 of the canonical JSON of the
//     structured event without its attestation* members and datacontenttype: what Python's
//     json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True) writes. Event.Structured
//     keeps the event as sent (numbers as json.Number: Python's digest tells 1 from 1.0 and
//     keeps integers beyond 2^53 exact).
//   - The token is Google-signed (RS256 under the certificate of its kid), issued by Google, and
//     valid, within 300 s of skew, when the message was published.
//   - A bridge's event is signed by its own VM (the token's google.compute_engine instance_id,
//     project_id and zone equal the event's extensions and data.instance); a cloud event
//     (data.origin "cloud") by the system-events function's service account (the token's email).
//
// One difference with Python: encoding/json replaces a lone UTF-16 surrogate escape
// ("\udc00") by U+FFFD, so an event carrying one does not verify here. No bridge can send one
// (it is not valid UTF-8); the verdict fails closed.

import (
	"bytes"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math"
	"math/big"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf16"
)

// AudiencePrefix starts every token's audience; the event's digest follows.
const AudiencePrefix = "maintenance-bridge:v1:"

// GoogleCertsURL serves Google's signing certificates as {kid: PEM}.
const GoogleCertsURL = "https://www.googleapis.com/oauth2/v1/certs"

// skew is how far the publish time may lie outside [iat, exp] (hosts' clocks), in seconds.
const skew = 300

var (
	pieceName = regexp.MustCompile(`^attestation([1-9][0-9]*)$`)
	integer   = regexp.MustCompile(`^-?[0-9]+$`)
	issuers   = map[string]bool{"https://accounts.google.com": true, "accounts.google.com": true}
)

// Forged says why a token does not prove an event's origin.
type Forged struct{ Reason string }

func (f *Forged) Error() string { return f.Reason }

func forged(format string, args ...any) error {
	return &Forged{fmt.Sprintf(format, args...)}
}

// parseExact decodes one JSON value, numbers kept as written (json.Number).
func parseExact(raw []byte) (any, error) {
	decoder := json.NewDecoder(bytes.NewReader(raw))
	decoder.UseNumber()
	var value any
	if err := decoder.Decode(&value); err != nil {
		return nil, err
	}
	if _, err := decoder.Token(); err != io.EOF {
		return nil, errors.New("data after the JSON value")
	}
	return value, nil
}

// Canonical writes a parseExact value as bridge/origin.py's canonical() does.
func Canonical(value any) ([]byte, error) {
	var out bytes.Buffer
	if err := writeCanonical(&out, value); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

func writeCanonical(out *bytes.Buffer, value any) error {
	switch v := value.(type) {
	case nil:
		out.WriteString("null")
	case bool:
		out.WriteString(strconv.FormatBool(v))
	case string:
		writeString(out, v)
	case json.Number:
		text, err := pythonNumber(string(v))
		if err != nil {
			return err
		}
		out.WriteString(text)
	case []any:
		out.WriteByte('[')
		for i, item := range v {
			if i > 0 {
				out.WriteByte(',')
			}
			if err := writeCanonical(out, item); err != nil {
				return err
			}
		}
		out.WriteByte(']')
	case map[string]any:
		keys := make([]string, 0, len(v))
		for key := range v {
			keys = append(keys, key)
		}
		sort.Strings(keys) // UTF-8 byte order is code point order, Python's
		out.WriteByte('{')
		for i, key := range keys {
			if i > 0 {
				out.WriteByte(',')
			}
			writeString(out, key)
			out.WriteByte(':')
			if err := writeCanonical(out, v[key]); err != nil {
				return err
			}
		}
		out.WriteByte('}')
	default:
		return fmt.Errorf("not a parseExact value: %T", value)
	}
	return nil
}

// writeString writes a JSON string as ensure_ascii does: JSON's short escapes, printable
// ASCII as is, anything else as lowercase \uXXXX (an astral character as its surrogate pair).
func writeString(out *bytes.Buffer, text string) {
	out.WriteByte('"')
	for _, r := range text {
		switch r {
		case '"':
			out.WriteString(`\"`)
		case '\\':
			out.WriteString(`\\`)
		case '\b':
			out.WriteString(`\b`)
		case '\f':
			out.WriteString(`\f`)
		case '\n':
			out.WriteString(`\n`)
		case '\r':
			out.WriteString(`\r`)
		case '\t':
			out.WriteString(`\t`)
		default:
			switch {
			case r >= 0x20 && r <= 0x7e:
				out.WriteRune(r)
			case r >= 0x10000:
				high, low := utf16.EncodeRune(r)
				fmt.Fprintf(out, `\u%04x\u%04x`, high, low)
			default:
				fmt.Fprintf(out, `\u%04x`, r)
			}
		}
	}
	out.WriteByte('"')
}

// pythonNumber renders a JSON number literal as Python reads and writes it: an integer
// exactly (and -0 as 0), anything else as the repr of its double.
func pythonNumber(literal string) (string, error) {
	if integer.MatchString(literal) {
		n, ok := new(big.Int).SetString(literal, 10)
		if !ok {
			return "", fmt.Errorf("bad integer %q", literal)
		}
		return n.String(), nil
	}
	x, err := strconv.ParseFloat(literal, 64)
	if err != nil && !errors.Is(err, strconv.ErrRange) { // out of range: ±Inf or 0, as Python
		return "", err
	}
	return pythonFloat(x), nil
}

// pythonFloat is Python's repr of a double: shortest digits, exponent form below 1e-4 or from
// 1e16, a fixed form always with a fraction.
func pythonFloat(x float64) string {
	switch {
	case math.IsInf(x, 1):
		return "Infinity"
	case math.IsInf(x, -1):
		return "-Infinity"
	case x == 0 && math.Signbit(x):
		return "-0.0"
	case x == 0:
		return "0.0"
	}
	sign := ""
	if x < 0 {
		sign = "-"
	}
	mantissa, exponent, _ := strings.Cut(strconv.FormatFloat(math.Abs(x), 'e', -1, 64), "e")
	digits := strings.Replace(mantissa, ".", "", 1)
	e, _ := strconv.Atoi(exponent)
	point := e + 1 // digits[:point] before the decimal point
	switch {
	case point <= -4 || point > 16:
		fraction := ""
		if len(digits) > 1 {
			fraction = "." + digits[1:]
		}
		expSign := "+"
		if e < 0 {
			expSign, e = "-", -e
		}
		return fmt.Sprintf("%s%s%se%s%02d", sign, digits[:1], fraction, expSign, e)
	case point <= 0:
		return sign + "0." + strings.Repeat("0", -point) + digits
	case point >= len(digits):
		return sign + digits + strings.Repeat("0", point-len(digits)) + ".0"
	default:
		return sign + digits[:point] + "." + digits[point:]
	}
}

// BindingOf is the audience a token for this structured event must carry.
func BindingOf(structured map[string]any) (string, error) {
	signed := map[string]any{}
	for name, value := range structured {
		if name != "datacontenttype" && !pieceName.MatchString(name) {
			signed[name] = value
		}
	}
	text, err := Canonical(signed)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(text)
	return AudiencePrefix + hex.EncodeToString(sum[:]), nil
}

// TokenOf is the token the event carries, its pieces joined by number (attestation10 after
// attestation9); "" when unattested. Pieces that do not run 1..N make a malformed token.
func TokenOf(structured map[string]any) string {
	pieces := map[int]any{}
	for name, value := range structured {
		if found := pieceName.FindStringSubmatch(name); found != nil {
			n, err := strconv.Atoi(found[1])
			if err != nil {
				return "." // a piece number beyond int: no token can be rebuilt
			}
			pieces[n] = value
		}
	}
	var token strings.Builder
	for n := 1; n <= len(pieces); n++ {
		piece, ok := pieces[n].(string)
		if !ok {
			return "." // a gap or a piece that is not a string
		}
		token.WriteString(piece)
	}
	return token.String()
}

// VerifyToken returns the token's claims if it is Google-signed, bound to audience and valid
// at `at` (when the message was published); else a *Forged error.
func VerifyToken(token, audience string, at time.Time, certs map[string]string) (map[string]any, error) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return nil, forged("malformed token")
	}
	var header struct {
		Alg string `json:"alg"`
		Kid string `json:"kid"`
	}
	var claims map[string]any
	signature, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err == nil {
		err = decodePart(parts[0], &header)
	}
	if err == nil {
		err = decodePart(parts[1], &claims)
	}
	if err != nil || claims == nil {
		return nil, forged("malformed token: %v", err)
	}
	if header.Alg != "RS256" {
		return nil, forged("algorithm %q is not RS256", header.Alg)
	}
	certificate, ok := certs[header.Kid]
	if !ok {
		return nil, forged("unknown key id %q", header.Kid)
	}
	key, err := rsaKey(certificate)
	if err != nil {
		return nil, forged("the certificate of key id %s: %v", header.Kid, err)
	}
	digest := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if rsa.VerifyPKCS1v15(key, crypto.SHA256, digest[:], signature) != nil {
		return nil, forged("signature does not verify")
	}
	if iss, _ := claims["iss"].(string); !issuers[iss] {
		return nil, forged("issuer %v", claims["iss"])
	}
	if aud, _ := claims["aud"].(string); aud != audience {
		return nil, forged("audience does not bind this event")
	}
	iat, okIat := wholeSeconds(claims["iat"])
	exp, okExp := wholeSeconds(claims["exp"])
	if !okIat || !okExp {
		return nil, forged("token has no iat/exp")
	}
	when := float64(at.UnixNano()) / 1e9
	if !(float64(iat-skew) <= when && when <= float64(exp+skew)) {
		return nil, forged("token was not valid when the event was published")
	}
	return claims, nil
}

func decodePart(part string, into any) error {
	raw, err := base64.RawURLEncoding.DecodeString(part)
	if err != nil {
		return err
	}
	decoder := json.NewDecoder(bytes.NewReader(raw))
	decoder.UseNumber()
	return decoder.Decode(into)
}

func wholeSeconds(value any) (int64, bool) {
	number, ok := value.(json.Number)
	if !ok || !integer.MatchString(string(number)) {
		return 0, false
	}
	seconds, err := number.Int64()
	return seconds, err == nil
}

func rsaKey(certificate string) (*rsa.PublicKey, error) {
	block, _ := pem.Decode([]byte(certificate))
	if block == nil {
		return nil, errors.New("not PEM")
	}
	parsed, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, err
	}
	key, ok := parsed.PublicKey.(*rsa.PublicKey)
	if !ok {
		return nil, errors.New("not an RSA key")
	}
	return key, nil
}

// VouchesFor returns a *Forged error unless the token's owner may speak for the event: its VM
// for a bridge's event, the system-events function's service account for a cloud event.
func VouchesFor(claims, structured map[string]any, cloudIdentity string) error {
	data, _ := structured["data"].(map[string]any)
	if data["origin"] == "cloud" {
		if cloudIdentity == "" {
			return forged("a cloud event, and no cloud identity is configured to check it by")
		}
		if claims["email"] != cloudIdentity || claims["email_verified"] != true {
			return forged("cloud event signed by %v, not %q", claims["email"], cloudIdentity)
		}
		return nil
	}
	google, _ := claims["google"].(map[string]any)
	compute, ok := google["compute_engine"].(map[string]any)
	if !ok {
		return forged("token has no compute_engine claims (not a VM's format=full token)")
	}
	instance, _ := data["instance"].(map[string]any)
	for _, check := range []struct {
		claim  string
		values []any
	}{
		{"instance_id", []any{structured["instanceid"], instance["id"]}},
		{"project_id", []any{structured["project"], instance["project_id"]}},
		{"zone", []any{structured["zone"], instance["zone"]}},
	} {
		signed, isString := compute[check.claim].(string)
		for _, value := range check.values {
			if !isString || value != signed {
				return forged("token of %s %v, event of %v", check.claim, compute[check.claim], value)
			}
		}
	}
	return nil
}

// Verdict is what a consumer learns of an event's origin: Verified, or why not (Reason;
// Attested false when the event carried no token at all).
type Verdict struct {
	Verified, Attested bool
	Reason             string
}

// VerifyOrigin is the origin verdict of a decoded event published at `at` (Event.PublishedAt,
// or when an HTTP POST was received); certs is {kid: PEM} (Certs.Get), needed only for an
// attested event; cloudIdentity the system-events function's service account email. An error
// is not a verdict: the structured event could not be written canonically.
func VerifyOrigin(event *Event, at time.Time, certs map[string]string, cloudIdentity string) (Verdict, error) {
	token := TokenOf(event.Structured)
	if token == "" {
		return Verdict{Reason: "unattested"}, nil
	}
	audience, err := BindingOf(event.Structured)
	if err != nil {
		return Verdict{}, err
	}
	claims, err := VerifyToken(token, audience, at, certs)
	if err == nil {
		err = VouchesFor(claims, event.Structured, cloudIdentity)
	}
	var bad *Forged
	if errors.As(err, &bad) {
		return Verdict{Attested: true, Reason: bad.Reason}, nil
	}
	return Verdict{Verified: true, Attested: true}, err
}

// Certs fetches Google's signing certificates from URL on first use and keeps them TTL (they
// rotate over days; a fetch per message would add a round trip to every event). A failed
// fetch is an error to retry (nack), not a forgery.
type Certs struct {
	URL string
	TTL time.Duration

	mu      sync.Mutex
	certs   map[string]string
	fetched time.Time
}

// Get returns the certificates by key id, fetching them when older than TTL.
func (c *Certs) Get() (map[string]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.certs != nil && time.Since(c.fetched) <= c.TTL {
		return c.certs, nil
	}
	client := http.Client{Timeout: 10 * time.Second}
	reply, err := client.Get(c.URL)
	if err != nil {
		return nil, err
	}
	defer reply.Body.Close()
	if reply.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("certificates: HTTP %d from %s", reply.StatusCode, c.URL)
	}
	var certs map[string]string
	if err := json.NewDecoder(reply.Body).Decode(&certs); err != nil {
		return nil, fmt.Errorf("certificates: %w", err)
	}
	c.certs, c.fetched = certs, time.Now()
	return certs, nil
}
