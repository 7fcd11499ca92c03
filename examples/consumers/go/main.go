package main

import (
	"encoding/json"
	"fmt"
	"os"
)

// `go run . FILE...` decodes each file and prints one line per event. A file is a golden
// binary-mode message ({"attributes": {...}, "data": {...}}, schemas/examples/*.pubsub.json)
// or a push request body / messagePublished data ({"message": {...}}).
func main() {
	failed := false
	for _, path := range os.Args[1:] {
		event, err := decodeFile(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			failed = true
			continue
		}
		fmt.Printf("%s %s %s seq=%d\n", event.Kind(), event.ID, event.StreamKey(), event.Data.Sequence.Value)
	}
	if failed {
		os.Exit(1)
	}
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
