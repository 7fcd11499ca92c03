package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"
)

// `go run . FILE...` decodes each file, verifies its origin and prints one line per event,
// ending with origin=verified, or origin=unverified (the reason) and whether it is acted on. A
// file is a golden binary-mode message ({"attributes": {...}, "data": {...}},
// schemas/examples/*.pubsub.json) or a push request body / messagePublished data
// ({"message": {...}}, its publishTime the time the token is judged at; else now).
//
// Verification follows the flags, whose defaults come from the environment the functions read:
// -certs-url (ATTESTATION_CERTS_URL, default Google's), -cloud-identity (CLOUD_EVENTS_IDENTITY,
// the system-events function's service account), -require-attestation (REQUIRE_ATTESTATION,
// default true: an unverified event is logged and not acted on).
//
// `go run . canonical` reads one JSON value a line on stdin and writes its canonical form, the
// text whose digest a token's audience carries (to see why an audience differs).
func main() {
	if len(os.Args) > 1 && os.Args[1] == "canonical" {
		os.Exit(canonicalLines())
	}
	certsURL := flag.String("certs-url", envOr("ATTESTATION_CERTS_URL", GoogleCertsURL), "signing certificates, {kid: PEM}")
	cloudIdentity := flag.String("cloud-identity", os.Getenv("CLOUD_EVENTS_IDENTITY"), "the system-events function's service account")
	required, err := truth(envOr("REQUIRE_ATTESTATION", "true"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	require := flag.Bool("require-attestation", required, "act only on verified events")
	flag.Parse()
	certs := &Certs{URL: *certsURL, TTL: time.Hour}
	failed := false
	for _, path := range flag.Args() {
		line, err := describe(path, certs, *cloudIdentity, *require)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			failed = true
			continue
		}
		fmt.Println(line)
	}
	if failed {
		os.Exit(1)
	}
}

func envOr(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

// truth reads REQUIRE_ATTESTATION as bridge/origin.py's Policy does.
func truth(raw string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(raw)) {
	case "true", "1", "yes", "on":
		return true, nil
	case "false", "0", "no", "off":
		return false, nil
	}
	return false, fmt.Errorf("REQUIRE_ATTESTATION must be true or false, not %q", raw)
}

func describe(path string, certs *Certs, cloudIdentity string, require bool) (string, error) {
	event, err := decodeFile(path)
	if err != nil {
		return "", err
	}
	keys := map[string]string{}
	if TokenOf(event.Structured) != "" { // an unattested event needs no certificates
		if keys, err = certs.Get(); err != nil {
			return "", err
		}
	}
	at := event.PublishedAt
	if at.IsZero() {
		at = time.Now()
	}
	verdict, err := VerifyOrigin(event, at, keys, cloudIdentity)
	if err != nil {
		return "", err
	}
	origin := "verified"
	if !verdict.Verified {
		action := "not acted on"
		if !require {
			action = "acted on"
		}
		origin = fmt.Sprintf("unverified (%s), %s", verdict.Reason, action)
		fmt.Fprintf(os.Stderr, "%s: unverified origin of %s: %s\n", path, event.ID, verdict.Reason)
	}
	return fmt.Sprintf("%s %s %s seq=%d origin=%s", event.Kind(), event.ID, event.StreamKey(), event.Data.Sequence.Value, origin), nil
}

func decodeFile(path string) (*Event, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var golden struct {
		Attributes map[string]string `json:"attributes"`
		Data       json.RawMessage   `json:"data"`
	}
	if err := json.Unmarshal(raw, &golden); err == nil && golden.Attributes != nil {
		return DecodePubSub(golden.Attributes, golden.Data)
	}
	return DecodeMessagePublished(raw)
}

func canonicalLines() int {
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 1<<24)
	status := 0
	for scanner.Scan() {
		value, err := parseExact(scanner.Bytes())
		var text []byte
		if err == nil {
			text, err = Canonical(value)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			status = 1
			continue
		}
		fmt.Println(string(text))
	}
	return status
}
