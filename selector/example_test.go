package selector_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"

	_ "github.com/rollcall-go/rollcall/backends/memory" // registers mem://
	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/selector"
)

// An HTTP client that sends http://greeter/... to the instances of the
// service greeter, preferring those of its zone.
func ExampleNewTransport() {
	ctx := context.Background()
	reg, err := registry.Open(ctx, "mem://example-transport")
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Close()

	// A server registers itself.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s, asked for %s%s", "greeter-1", r.Host, r.URL.Path)
	}))
	defer srv.Close()
	if _, err := reg.Register(ctx, registry.Instance{Service: "greeter", ID: "greeter-1", Addr: srv.Listener.Addr().String(),
		Metadata: map[string]string{registry.MetaZone: "eu-1a", registry.MetaWeight: "2"}}); err != nil {
		log.Fatal(err)
	}

	// A client picks its instances.
	w, err := reg.Watch(ctx, "greeter")
	if err != nil {
		log.Fatal(err)
	}
	p := selector.NewPicker(w, &selector.Options{Zone: "eu-1a"})
	defer p.Close()
	client := &http.Client{Transport: selector.NewTransport(nil, p)}
	resp, err := client.Get("http://greeter/hi")
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(string(body))
	// Output: hello from greeter-1, asked for greeter/hi
}

// A Picker for any protocol: Pick returns the instance to call.
func ExamplePicker_Pick() {
	ctx := context.Background()
	reg, err := registry.Open(ctx, "mem://example-pick")
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Close()
	for _, in := range []registry.Instance{
		{Service: "db", ID: "a", Addr: "10.0.0.1:5432", Metadata: map[string]string{registry.MetaVersion: "v1"}},
		{Service: "db", ID: "b", Addr: "10.0.0.2:5432", Metadata: map[string]string{registry.MetaVersion: "v2", registry.MetaWeight: "2"}},
		{Service: "db", ID: "c", Addr: "10.0.0.3:5432", Metadata: map[string]string{registry.MetaVersion: "v2"}},
	} {
		if _, err := reg.Register(ctx, in); err != nil {
			log.Fatal(err)
		}
	}
	w, err := reg.Watch(ctx, "db")
	if err != nil {
		log.Fatal(err)
	}
	p := selector.NewPicker(w, &selector.Options{Filter: registry.MatchMetadata(registry.MetaVersion, "v2")})
	defer p.Close()
	counts := map[string]int{}
	for range 300 {
		in, err := p.Pick(ctx)
		if err != nil {
			log.Fatal(err)
		}
		counts[in.ID]++
	}
	fmt.Println(counts)
	// Output: map[b:200 c:100]
}
