package nacos_test

import (
	"context"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/backends/nacos"
	"github.com/rollcall-go/rollcall/registry"
)

// Issue 11 item 12: a server that adds bookkeeping keys to the metadata of
// the instances it stores (Polaris' Nacos plugin adds internal-nacos-*)
// still shows what rollcall sent: Register and Update return once the
// server shows the fields and keys rollcall sent (and no longer shows a key
// an Update removed), instead of waiting for their deadline and failing.
func TestServerAddedMetadataKeysAreIgnored(t *testing.T) {
	srv := startServer(t)
	srv.SetAddedMetadata(map[string]string{"internal-nacos-service": "svc@@DEFAULT_GROUP", "internal-nacos-cluster": "DEFAULT"})
	r := newRegistry(t, newClient(t, srv, nacos.ClientOptions{}), nil)
	in := registry.Instance{Service: "added", ID: "a", Addr: "127.0.0.1:9001", Metadata: map[string]string{"team": "core", "version": "v1"}}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	g, err := r.Register(ctx, in)
	if err != nil {
		t.Fatalf("Register on a server that adds metadata keys: %v", err)
	}
	in.Metadata = map[string]string{"version": "v2"} // "team" removed
	if err := g.Update(ctx, in); err != nil {
		t.Fatalf("Update on a server that adds metadata keys: %v", err)
	}
	list, err := r.Lookup(ctx, "added")
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Metadata["version"] != "v2" || list[0].Metadata["team"] != "" {
		t.Fatalf("Lookup after the Update = %v, want version v2 and no team", list)
	}
}
