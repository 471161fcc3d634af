package consul_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/rollcall-go/rollcall/registry"
)

func TestOpenRejectsBadURLs(t *testing.T) {
	for _, u := range []string{
		"consul://127.0.0.1:8500/?ttl=banana",
		"consul://127.0.0.1:8500/?ttl=0s",
		"consul://127.0.0.1:8500/?wait=-1s",
		"consul://127.0.0.1:8500/?unknown=1",
		"consul://127.0.0.1:8500/?token=hunter2&nope=1",
		"consul://127.0.0.1:8500/?token=hunter2&token=hunter2",
		"consul://127.0.0.1:8500/?token=hunter2&dc=a&dc=b",
		"consul://127.0.0.1:8500/team~a",
		"consul://127.0.0.1:8500/team-a/",
		"consul://127.0.0.1:8500/team a",
		"consul://127.0.0.1:8500/#frag",
		"consul://127.0.0.1:8500,127.0.0.1:8501/",
		"consul://127.0.0.1:8500/?tls=yes-please",
		"consul://127.0.0.1:8500/?tls=false&insecure_skip_verify=true",
		"consul://127.0.0.1:8500/?key_file=/k.pem",
		"consul://127.0.0.1:8500/?key=/k.pem",
		"consul://127.0.0.1:8500/?cert=/c.pem&key_file=/k.pem&ca=/nonexistent/ca.pem",
		"consul://127.0.0.1:8500/?ca=/a.pem&ca_file=/a.pem", // one parameter, two spellings
		"consul://127.0.0.1:8500/?cert=/c.pem&cert_file=/c.pem&key=/k.pem",
		"consul://127.0.0.1:8500/?ca=/nonexistent/ca.pem",
		"consul://127.0.0.1:8500/?deregister_after=59s",
		"consul://127.0.0.1:8500/?ca_file=/nonexistent/ca.pem&token=hunter2",
		"consul://user:s3cret@127.0.0.1:8500/?ttl=x",
		"consul:opaque",
	} {
		r, err := registry.Open(context.Background(), u)
		if err == nil {
			r.Close()
			t.Errorf("Open(%q) succeeded", u)
			continue
		}
		if !errors.Is(err, registry.ErrInvalidURL) {
			t.Errorf("Open(%q) = %v, want ErrInvalidURL", u, err)
		}
		if strings.Contains(err.Error(), "hunter2") || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("Open(%q) error reveals a credential: %v", u, err)
		}
	}
}

func TestOpenDoesNotDial(t *testing.T) {
	for _, u := range []string{
		"consul://127.0.0.1:1/?ttl=5s&dc=dc1&token=x&wait=10s&deregister_after=2m",
		"consul://127.0.0.1:1",
		"consul:///",
		"consul://localhost/",
		"consul://u:p@127.0.0.1:1/",
		"consul://[::1]:1/?tls=true&server_name=consul.local&insecure_skip_verify=true",
		"consul://127.0.0.1:1/?tls=true&tls=true",
	} {
		r, err := registry.Open(context.Background(), u)
		if strings.HasSuffix(u, "tls=true&tls=true") {
			if err == nil {
				r.Close()
				t.Errorf("Open(%q): a parameter given twice was accepted", u)
			}
			continue
		}
		if err != nil {
			t.Errorf("Open(%q): %v", u, err)
			continue
		}
		if err := r.Close(); err != nil {
			t.Errorf("Close of %q: %v", u, err)
		}
	}
}
