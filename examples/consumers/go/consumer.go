// Package main decodes maintenance-bridge events in Go, standard library only.
//
// The steps are those of docs/events.md ("Decoding in any language") and of the Node example:
//
//  1. Unwrap the delivery: a pulled Pub/Sub message is (attributes, payload bytes); a push
//     request body and the data of an Eventarc messagePublished event both hold it as
//     {"message": {"attributes": {...}, "data": "<base64>"}}.
//  2. Pick the content mode from the content-type attribute (the CloudEvents Go SDK writes
//     Content-Type: accept both): application/cloudevents... is structured (the payload is
//     the whole event as JSON), anything else binary (ce-* attributes and the payload as data).
//  3. Decode data, ignoring unknown fields (fields are added within v1).
//  4. Read sequence as an int64 that JSON may carry as a number or a decimal string.
//  5. Order and deduplicate per (instance id, stream_id, sequence); deduplicate on source + id.
//  6. Verify its origin (origin.go, VerifyOrigin): the VM that signed the event's token is the
//     VM it speaks for, judged at the message's publish time; an unverified event is logged and
//     not acted on.
//
// Dependency-free on purpose: the CloudEvents Go SDK's Pub/Sub protocol binding needs the
// Pub/Sub client library, and a subscriber that already has a message needs neither.
package main

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

var extensionName = regexp.MustCompile(`^[a-z0-9]{1,20}$`)

// Int64 reads a JSON number or a decimal string (proto3's canonical JSON for int64).
type Int64 struct {
	Value int64
	Set   bool
}

// UnmarshalJSON accepts 42 and "42", nothing else.
func (n *Int64) UnmarshalJSON(raw []byte) error {
	text := string(raw)
	if unquoted, err := strconv.Unquote(text); err == nil && strings.HasPrefix(text, `"`) {
		text = unquoted
	}
	value, err := strconv.ParseInt(text, 10, 64)
	if err != nil {
		return fmt.Errorf("not an int64: %s", raw)
	}
	n.Value, n.Set = value, true
	return nil
}

// Instance is the VM the event is about.
type Instance struct {
	ID            string `json:"id"`
	Name          string `json:"name"`
	Zone          string `json:"zone"`
	ProjectID     string `json:"project_id"`
	ProjectNumber string `json:"project_number"`
	Hostname      string `json:"hostname"`
}

// Upcoming is a maintenance window (upcoming.* events only).
type Upcoming struct {
	Type                  string   `json:"type"`
	CanReschedule         *bool    `json:"can_reschedule"`
	WindowStartTime       string   `json:"window_start_time"`
	WindowEndTime         string   `json:"window_end_time"`
	LatestWindowStartTime string   `json:"latest_window_start_time"`
	MaintenanceStatus     string   `json:"maintenance_status"`
	MaintenanceReasons    []string `json:"maintenance_reasons"`
}

// EventData is the data of every event (schemas/v1/event-data.schema.json).
type EventData struct {
	Key               string            `json:"key"`
	Previous          string            `json:"previous"`
	Current           string            `json:"current"`
	ObservedAt        string            `json:"observed_at"`
	HappenedWhileDown bool              `json:"happened_while_down"`
	AtStartup         bool              `json:"at_startup"`
	Sequence          Int64             `json:"sequence"`
	StreamID          string            `json:"stream_id"`
	Instance          Instance          `json:"instance"`
	Scheduling        map[string]string `json:"scheduling"`
	NoticeSeconds     *int              `json:"notice_seconds"`
	Upcoming          *Upcoming         `json:"upcoming"`
}

// Event is one maintenance-bridge CloudEvent. Structured is the event as sent, in structured
// form and parsed exactly (numbers as json.Number), which VerifyOrigin digests; PublishedAt is
// when Pub/Sub published it (set by DecodeMessagePublished; for a pulled message, set it from
// the message's PublishTime), zero when unknown.
type Event struct {
	ID, Source, Type, Time, Subject string
	Extensions                      map[string]string
	Data                            EventData
	Structured                      map[string]any
	PublishedAt                     time.Time
}

// Kind is the type without its prefix, e.g. maintenance.started.
func (e *Event) Kind() string {
	parts := strings.Split(e.Type, ".")
	if len(parts) < 2 {
		return e.Type
	}
	return strings.Join(parts[len(parts)-2:], ".")
}

// StreamKey is the scope in which Data.Sequence orders and deduplicates events.
func (e *Event) StreamKey() string {
	return e.Data.Instance.ID + "/" + e.Data.StreamID
}

// DecodePubSub reads a Pub/Sub message in either content mode.
func DecodePubSub(attributes map[string]string, payload []byte) (*Event, error) {
	contentType, ok := attributes["content-type"]
	if !ok {
		contentType = attributes["Content-Type"]
	}
	if strings.HasPrefix(strings.ToLower(contentType), "application/cloudevents") {
		return decodeStructured(payload)
	}
	context := map[string]string{}
	structured := map[string]any{}
	for name, value := range attributes {
		if strings.HasPrefix(name, "ce-") {
			context[strings.TrimPrefix(name, "ce-")] = value
			structured[strings.TrimPrefix(name, "ce-")] = value
		}
	}
	data, err := parseExact(payload)
	if err != nil {
		return nil, fmt.Errorf("data: %w", err)
	}
	structured["data"] = data
	return build(context, payload, structured)
}

// DecodeMessagePublished reads a push request body or an Eventarc messagePublished data.
func DecodeMessagePublished(body []byte) (*Event, error) {
	var envelope struct {
		Message *struct {
			Attributes  map[string]string `json:"attributes"`
			Data        string            `json:"data"`
			PublishTime string            `json:"publishTime"`
		} `json:"message"`
	}
	if err := json.Unmarshal(body, &envelope); err != nil {
		return nil, fmt.Errorf("envelope: %w", err)
	}
	if envelope.Message == nil {
		return nil, errors.New("no message object")
	}
	payload, err := base64.StdEncoding.DecodeString(envelope.Message.Data)
	if err != nil {
		return nil, fmt.Errorf("message.data: %w", err)
	}
	event, err := DecodePubSub(envelope.Message.Attributes, payload)
	if err != nil || envelope.Message.PublishTime == "" {
		return event, err
	}
	event.PublishedAt, err = time.Parse(time.RFC3339Nano, envelope.Message.PublishTime)
	if err != nil {
		return nil, fmt.Errorf("message.publishTime: %w", err)
	}
	return event, nil
}

func decodeStructured(payload []byte) (*Event, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(payload, &fields); err != nil {
		return nil, fmt.Errorf("structured event: %w", err)
	}
	exact, err := parseExact(payload)
	if err != nil {
		return nil, fmt.Errorf("structured event: %w", err)
	}
	data, ok := fields["data"]
	if !ok {
		return nil, errors.New("structured event has no data")
	}
	context := map[string]string{}
	for name, raw := range fields {
		if name == "data" || name == "datacontenttype" {
			continue
		}
		var value string
		if err := json.Unmarshal(raw, &value); err != nil {
			return nil, fmt.Errorf("attribute %q must be a string", name)
		}
		context[name] = value
	}
	return build(context, data, exact.(map[string]any))
}

func build(context map[string]string, data []byte, structured map[string]any) (*Event, error) {
	if context["specversion"] != "1.0" {
		return nil, fmt.Errorf("unsupported specversion %q", context["specversion"])
	}
	event := &Event{Extensions: map[string]string{}, Structured: structured}
	for name, value := range context {
		switch name {
		case "specversion", "dataschema":
		case "id":
			event.ID = value
		case "source":
			event.Source = value
		case "type":
			event.Type = value
		case "time":
			event.Time = value
		case "subject":
			event.Subject = value
		default:
			if !extensionName.MatchString(name) {
				return nil, fmt.Errorf("invalid attribute name %q", name)
			}
			event.Extensions[name] = value
		}
	}
	if event.ID == "" || event.Source == "" || event.Type == "" {
		return nil, errors.New("id, source and type are required")
	}
	if err := json.Unmarshal(data, &event.Data); err != nil {
		return nil, fmt.Errorf("data: %w", err)
	}
	if event.Data.Key == "" || event.Data.Instance.ID == "" || !event.Data.Sequence.Set {
		return nil, errors.New("data: key, instance.id and sequence are required")
	}
	return event, nil
}
