package main

import (
	"encoding/json"
	"time"

	"github.com/rollcall-go/rollcall/registry"
)

// The JSON shapes of --json. Field names are part of the command's
// interface: add fields, never rename them.

type jsonInstance struct {
	Service  string            `json:"service"`
	ID       string            `json:"id"`
	Addr     string            `json:"addr"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

func jsonInstances(list []registry.Instance) []jsonInstance {
	out := make([]jsonInstance, len(list))
	for i, in := range list {
		out[i] = jsonInstance(in)
	}
	return out
}

// jsonService is one line of `ls URL --json`.
type jsonService struct {
	Service   string `json:"service"`
	Instances int    `json:"instances"`
}

// jsonUpdate is one line of `watch --json`: a registry.Update.
type jsonUpdate struct {
	Time      time.Time      `json:"time"`
	Stale     bool           `json:"stale"`
	Synced    bool           `json:"synced"`
	Error     string         `json:"error,omitempty"`
	Instances []jsonInstance `json:"instances"`
	Added     []string       `json:"added"`
	Changed   []string       `json:"changed"`
	Removed   []string       `json:"removed"`
}

func jsonUpdateOf(now time.Time, u registry.Update) jsonUpdate {
	ids := func(list []registry.Instance) []string {
		out := make([]string, len(list))
		for i, in := range list {
			out[i] = in.ID
		}
		return out
	}
	j := jsonUpdate{Time: now, Stale: u.Stale, Synced: u.Synced, Instances: jsonInstances(u.Instances()),
		Added: ids(u.Added), Changed: ids(u.Changed), Removed: ids(u.Removed)}
	if u.Err != nil {
		j.Error = u.Err.Error()
	}
	return j
}

// jsonEvent is one line of `register --json`: a state change.
type jsonEvent struct {
	Time     time.Time `json:"time"`
	Event    string    `json:"event"` // registered, lost, registered-again, deregistered
	Service  string    `json:"service"`
	ID       string    `json:"id"`
	Addr     string    `json:"addr"`
	Registry string    `json:"registry"` // the URL, credentials redacted
	Error    string    `json:"error,omitempty"`
}

// printJSON writes v to stdout, indented with indent, or on one line when
// indent is empty.
func (c *cli) printJSON(v any, indent string) error {
	enc := json.NewEncoder(c.stdout)
	enc.SetIndent("", indent)
	return enc.Encode(v)
}
