package selector_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/selector"
)

// BenchmarkPick measures Picker.Pick over n instances with weights 1-10
// (grpcresolver's BenchmarkPick has gRPC's round_robin for comparison).
func BenchmarkPick(b *testing.B) {
	for _, n := range []int{10, 1000} {
		for _, zone := range []string{"", "a"} {
			name := fmt.Sprintf("weighted/%d", n)
			if zone != "" {
				name = fmt.Sprintf("zone/%d", n)
			}
			b.Run(name, func(b *testing.B) {
				e := newEnv(b)
				for i := range n {
					e.register(b, registry.Instance{Service: "svc", ID: fmt.Sprint(i), Addr: fmt.Sprintf("10.0.%d.%d:80", i/250, i%250+1),
						Metadata: map[string]string{registry.MetaWeight: fmt.Sprint(1 + i%10), registry.MetaZone: []string{"a", "b"}[i%2]}})
				}
				p := e.picker(b, "svc", &selector.Options{Zone: zone})
				want := n
				if zone != "" {
					want = n / 2
				}
				seen := map[string]bool{}
				waitFor(b, 10*time.Second, "every instance picked", func() bool {
					for range 20 * n {
						in, err := p.Pick(context.Background())
						if err != nil {
							b.Fatal(err)
						}
						seen[in.ID] = true
					}
					return len(seen) == want
				})
				ctx := context.Background()
				b.ReportAllocs()
				b.ResetTimer()
				for b.Loop() {
					if _, err := p.Pick(ctx); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkTransport measures a GET to one loopback server through
// http.DefaultTransport, by the server's address and through Transport by
// the service name.
func BenchmarkTransport(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") }))
	defer srv.Close()
	e := newEnv(b)
	e.register(b, registry.Instance{Service: "web", ID: "a", Addr: srv.Listener.Addr().String()})
	p := e.picker(b, "web", nil)
	for _, c := range []struct {
		name string
		rt   http.RoundTripper
		url  string
	}{
		{"DefaultTransport", http.DefaultTransport, srv.URL + "/"},
		{"selector.Transport", selector.NewTransport(http.DefaultTransport, p), "http://web/"},
	} {
		b.Run(c.name, func(b *testing.B) {
			client := &http.Client{Transport: c.rt}
			b.ReportAllocs()
			for b.Loop() {
				resp, err := client.Get(c.url)
				if err != nil {
					b.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		})
	}
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
}

// stubTransport answers every request at once, without a network.
type stubTransport struct{ resp http.Response }

func (s *stubTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	r := s.resp
	r.Request = req
	return &r, nil
}

// BenchmarkTransportOverhead measures what Transport adds to a request:
// the wrapped transport answers at once, so the figure is the pick, the
// request's copy, and the stub's own response copy (the "stub" row).
func BenchmarkTransportOverhead(b *testing.B) {
	e := newEnv(b)
	e.register(b, registry.Instance{Service: "web", ID: "a", Addr: "127.0.0.1:1"})
	p := e.picker(b, "web", nil)
	stub := &stubTransport{resp: http.Response{StatusCode: 200, Body: http.NoBody}}
	for _, c := range []struct {
		name string
		rt   http.RoundTripper
	}{
		{"stub", stub},
		{"selector.Transport+stub", selector.NewTransport(stub, p)},
	} {
		b.Run(c.name, func(b *testing.B) {
			req, err := http.NewRequest("GET", "http://web/x", nil)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := c.rt.RoundTrip(req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
