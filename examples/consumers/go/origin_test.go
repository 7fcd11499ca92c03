package main

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A signer like Google's (and the simulator's): an RSA key, its self-signed certificate under
// a key id. tests/test_consumers.py checks the same against the simulator's real tokens.
type signer struct {
	key   *rsa.PrivateKey
	certs map[string]string
}

func newSigner(t *testing.T) *signer {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "test-identity"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	certificate := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return &signer{key, map[string]string{"kid-1": string(certificate)}}
}

func (s *signer) token(t *testing.T, claims map[string]any) string {
	t.Helper()
	part := func(value any) string {
		return base64.RawURLEncoding.EncodeToString(mustJSON(t, value))
	}
	signed := part(map[string]string{"alg": "RS256", "kid": "kid-1", "typ": "JWT"}) + "." + part(claims)
	digest := sha256.Sum256([]byte(signed))
	signature, err := rsa.SignPKCS1v15(rand.Reader, s.key, crypto.SHA256, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	return signed + "." + base64.RawURLEncoding.EncodeToString(signature)
}

// vmClaims are a format=full token's claims for the golden events' VM, bound to audience.
func vmClaims(audience string, issued time.Time, instanceID string) map[string]any {
	return map[string]any{
		"iss": "https://accounts.google.com", "aud": audience, "email_verified": true,
		"email": "123456789012-compute@developer.gserviceaccount.com",
		"iat":   issued.Unix(), "exp": issued.Add(time.Hour).Unix(),
		"google": map[string]any{"compute_engine": map[string]any{
			"instance_id": instanceID, "project_id": "demo-project", "zone": "us-central1-a",
		}},
	}
}

// attested is the golden structured event of kind with token in pieces of 1000 characters,
// as a structured-mode message decodes it.
func attested(t *testing.T, kind string, sign func(audience string) string, edit func(map[string]any)) *Event {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(examples, kind+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var structured map[string]any
	if err := json.Unmarshal(raw, &structured); err != nil {
		t.Fatal(err)
	}
	if sign != nil {
		exact, _ := parseExact(raw)
		audience, err := BindingOf(exact.(map[string]any))
		if err != nil {
			t.Fatal(err)
		}
		token := sign(audience)
		for n := 1; len(token) > 0; n++ {
			piece := token[:min(1000, len(token))]
			structured["attestation"+strconv.Itoa(n)], token = piece, token[len(piece):]
		}
	}
	if edit != nil {
		edit(structured)
	}
	event, err := DecodePubSub(map[string]string{"content-type": "application/cloudevents+json"}, mustJSON(t, structured))
	if err != nil {
		t.Fatal(err)
	}
	return event
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

func TestOriginVerdicts(t *testing.T) {
	s := newSigner(t)
	now := time.Now()
	const instance = "4520031799277579481"
	const cloudIdentity = "system-events@demo-project.iam.gserviceaccount.com"
	vm := func(id string) func(string) string {
		return func(audience string) string { return s.token(t, vmClaims(audience, now, id)) }
	}
	asAccount := func(email string) func(string) string {
		return func(audience string) string {
			claims := vmClaims(audience, now, instance)
			claims["email"] = email
			return s.token(t, claims)
		}
	}
	startedAudience, err := BindingOf(attested(t, "maintenance.started", nil, nil).Structured)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		event  *Event
		at     time.Time
		reason string // "" when verified
	}{
		{"genuine", attested(t, "maintenance.started", vm(instance), nil), now, ""},
		{"published within the skew after expiry", attested(t, "maintenance.started", vm(instance), nil), now.Add(time.Hour + 4*time.Minute), ""},
		{"published after expiry", attested(t, "maintenance.started", vm(instance), nil), now.Add(5 * time.Hour), "not valid"},
		{"another VM's token", attested(t, "maintenance.started", vm("999"), nil), now, "instance_id"},
		{"tampered", attested(t, "maintenance.started", vm(instance), func(e map[string]any) {
			e["data"].(map[string]any)["current"] = "TERMINATE_ON_HOST_MAINTENANCE"
		}), now, "audience"},
		{"replayed on another event", attested(t, "maintenance.ended", func(string) string {
			return vm(instance)(startedAudience)
		}, nil), now, "audience"},
		{"a piece missing", attested(t, "maintenance.started", vm(instance), func(e map[string]any) {
			e["attestation2"] = e["attestation1"]
			delete(e, "attestation1")
		}), now, "malformed"},
		{"unattested", attested(t, "maintenance.started", nil, nil), now, "unattested"},
		{"cloud event, its account", attested(t, "cloud.migrated", asAccount(cloudIdentity), nil), now, ""},
		{"cloud event, a VM's account", attested(t, "cloud.migrated", vm(instance), nil), now, "cloud event signed by"},
	} {
		verdict, err := VerifyOrigin(c.event, c.at, s.certs, cloudIdentity)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if verdict.Verified != (c.reason == "") || !strings.Contains(verdict.Reason, c.reason) {
			t.Errorf("%s: %+v, want %q", c.name, verdict, c.reason)
		}
	}
	other := newSigner(t)
	verdict, _ := VerifyOrigin(attested(t, "maintenance.started", vm(instance), nil), now, other.certs, "")
	if verdict.Verified || !strings.Contains(verdict.Reason, "signature") {
		t.Errorf("a token checked under another key: %+v", verdict)
	}
}

func TestTokenPiecesJoinByNumber(t *testing.T) {
	structured := map[string]any{}
	for n := 1; n <= 11; n++ {
		structured["attestation"+strconv.Itoa(n)] = strconv.Itoa(n%10) + "."
	}
	if token := TokenOf(structured); token != "1.2.3.4.5.6.7.8.9.0.1." {
		t.Fatalf("joined %q", token)
	}
}

func TestCanonicalIsPythons(t *testing.T) {
	// Expected: Python's json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"),
	// ensure_ascii=True).
	for text, want := range map[string]string{
		`{"b":1,"a":"é😀\u0000\u007f\n\"\\","\ue000":0,"😀":0}`:               `{"a":"\u00e9\ud83d\ude00\u0000\u007f\n\"\\","b":1,"\ue000":0,"\ud83d\ude00":0}`,
		`[12345678901234567890123,-0,1.0,1e16,1e15,1e-5,0.0001,-0.0,1e400]`: `[12345678901234567890123,0,1.0,1e+16,1000000000000000.0,1e-05,0.0001,-0.0,Infinity]`,
	} {
		value, err := parseExact([]byte(text))
		if err != nil {
			t.Fatal(err)
		}
		got, err := Canonical(value)
		if err != nil || string(got) != want {
			t.Errorf("%s: %s (%v), want %s", text, got, err, want)
		}
	}
}
