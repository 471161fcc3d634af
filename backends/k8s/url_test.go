package k8s

import (
	"context"
	"net/url"
	"os"
	"path/filepath"
	"testing"
)

// TestOpenURLNamespace: the namespace comes from the URL, else from the
// kubeconfig context.
func TestOpenURLNamespace(t *testing.T) {
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kc, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: t0ken}}]
contexts:
- {name: one, context: {cluster: c, user: u, namespace: ns-one}}
- {name: two, context: {cluster: c, user: u}}
current-context: one
`), 0o600); err != nil {
		t.Fatal(err)
	}
	q := url.QueryEscape(kc)
	for raw, want := range map[string]string{
		"k8s://explicit?kubeconfig=" + q:          "explicit",
		"k8s://?kubeconfig=" + q:                  "ns-one",
		"k8s:///?kubeconfig=" + q:                 "ns-one",
		"k8s://?kubeconfig=" + q + "&context=two": "default",
		"k8s://x?kubeconfig=" + q + "&ttl=3s":     "x",
	} {
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatal(err)
		}
		r, err := openURL(context.Background(), u)
		if err != nil {
			t.Errorf("openURL(%s): %v", raw, err)
			continue
		}
		if got := r.(*kubeRegistry).b.ns; got != want {
			t.Errorf("openURL(%s): namespace %q, want %q", raw, got, want)
		}
		r.Close()
	}
}
