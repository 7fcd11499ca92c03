package main

import (
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const examples = "../../../schemas/examples"

func golden(t *testing.T, kind string) (map[string]string, map[string]any) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(examples, kind+".pubsub.json"))
	if err != nil {
		t.Fatal(err)
	}
	var form struct {
		Attributes map[string]string `json:"attributes"`
		Data       map[string]any    `json:"data"`
	}
	if err := json.Unmarshal(raw, &form); err != nil {
		t.Fatal(err)
	}
	return form.Attributes, form.Data
}

func mustJSON(t *testing.T, value any) []byte {
	t.Helper()
	out, err := json.Marshal(value)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestEveryEnvelopeAndMode(t *testing.T) {
	paths, _ := filepath.Glob(filepath.Join(examples, "*.pubsub.json"))
	if len(paths) == 0 {
		t.Fatal("no golden messages")
	}
	for _, path := range paths {
		kind := strings.TrimSuffix(filepath.Base(path), ".pubsub.json")
		attributes, data := golden(t, kind)
		structured, err := os.ReadFile(filepath.Join(examples, kind+".json"))
		if err != nil {
			t.Fatal(err)
		}
		capitalised := map[string]string{"Content-Type": attributes["content-type"]}
		for name, value := range attributes {
			if name != "content-type" {
				capitalised[name] = value
			}
		}
		push := mustJSON(t, map[string]any{"message": map[string]any{
			"attributes": map[string]string{"content-type": "application/cloudevents+json; charset=UTF-8"},
			"data":       base64.StdEncoding.EncodeToString(structured),
		}})
		deliveries := map[string]func() (*Event, error){
			"binary":       func() (*Event, error) { return DecodePubSub(attributes, mustJSON(t, data)) },
			"Content-Type": func() (*Event, error) { return DecodePubSub(capitalised, mustJSON(t, data)) },
			"push":         func() (*Event, error) { return DecodeMessagePublished(push) },
		}
		for label, decode := range deliveries {
			event, err := decode()
			if err != nil {
				t.Fatalf("%s %s: %v", kind, label, err)
			}
			if event.Kind() != kind || event.ID != attributes["ce-id"] || event.Data.StreamID == "" {
				t.Fatalf("%s %s: decoded %+v", kind, label, event)
			}
		}
	}
}

func TestLaterV1EventAndSequenceAsString(t *testing.T) {
	attributes, data := golden(t, "maintenance.started")
	data["sequence"] = "4"
	data["added_in_v1_9"] = map[string]any{"x": 1}
	attributes["ce-region"] = "us-central1"
	event, err := DecodePubSub(attributes, mustJSON(t, data))
	if err != nil {
		t.Fatal(err)
	}
	if event.Data.Sequence.Value != 4 || event.Extensions["region"] != "us-central1" {
		t.Fatalf("decoded %+v", event)
	}
}

func TestBadEventsFail(t *testing.T) {
	for name, sequence := range map[string]any{"words": "four", "float": 4.5, "null": nil} {
		attributes, data := golden(t, "maintenance.started")
		data["sequence"] = sequence
		if _, err := DecodePubSub(attributes, mustJSON(t, data)); err == nil {
			t.Errorf("sequence %s accepted", name)
		}
	}
	attributes, data := golden(t, "maintenance.started")
	delete(attributes, "ce-id")
	if _, err := DecodePubSub(attributes, mustJSON(t, data)); err == nil {
		t.Error("an event without id accepted")
	}
	if _, err := DecodeMessagePublished([]byte(`{"message": {"data": "%%"}}`)); err == nil {
		t.Error("bad base64 accepted")
	}
}
