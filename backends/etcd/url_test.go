package etcd_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/rollcall-go/rollcall/registry"
)

// TestOpenURL: Open never dials, accepts the documented forms and rejects
// the rest with ErrInvalidURL, never showing the password.
func TestOpenURL(t *testing.T) {
	ctx := context.Background()
	good := []string{
		"etcd://127.0.0.1:1",
		"etcd://127.0.0.1:1/",
		"etcd://127.0.0.1:1,127.0.0.2:1/team-a?ttl=30s&dial-timeout=1s",
		"etcd://root:s3cret@127.0.0.1:1/a/b?ttl=5s",
		"etcd://127.0.0.1:1/?tls=true",
		"etcd://127.0.0.1:1/?layout=rollcall",
		"etcd://127.0.0.1:1/?layout=gozero",
		"etcd://127.0.0.1:1/team-a?layout=kratos&kratos-scheme=http",
	}
	for _, u := range good {
		r, err := registry.Open(ctx, u) // nothing listens on port 1: Open must not care
		if err != nil {
			t.Errorf("Open(%q): %v", u, err)
			continue
		}
		if err := r.Close(); err != nil {
			t.Errorf("Close(%q): %v", u, err)
		}
	}
	bad := map[string]string{
		"etcd://":                                      "no host",
		"etcd://h:1/?ttl=10":                           "not a positive duration",
		"etcd://h:1/?tls=yes":                          "not true or false",
		"etcd://h:1/?prefix=x":                         "unknown parameter",
		"etcd://h:1/?ttl=1s&ttl=2s":                    "given 2 times",
		"etcd://h/":                                    "not host:port",
		"etcd://h1,h2:1/":                              "not host:port",
		"etcd://h:1/a//b":                              "empty or dot segment",
		"etcd://h:1/?cert=c.pem":                       "cert and key go together",
		"etcd://h:1/?ca=/nonexistent.pem":              "reading CA",
		"etcd://root:s3cret@h:1/?token=s3cret":         "unknown parameter",
		"etcd://h:1/?layout=zk":                        "not one of rollcall, gozero, kratos",
		"etcd://h:1/?kratos-scheme=grpc":               "for layout=kratos only",
		"etcd://h:1/?layout=kratos&kratos-scheme=Grpc": "not a URL scheme",
	}
	for u, want := range bad {
		_, err := registry.Open(ctx, u)
		if !errors.Is(err, registry.ErrInvalidURL) || !strings.Contains(err.Error(), want) {
			t.Errorf("Open(%q) = %v; want ErrInvalidURL saying %q", u, err, want)
		}
		if err != nil && strings.Contains(err.Error(), "s3cret") {
			t.Errorf("Open(%q) error shows the password: %v", u, err)
		}
	}
}
