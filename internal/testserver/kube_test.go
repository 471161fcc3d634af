package testserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
)

// TestKube: users and their tokens, pause, stop and start on the same port
// with the same data, and a wipe.
func TestKube(t *testing.T) {
	k := StartKube(t, &KubeOptions{Users: []string{"alice"}})
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(k.CAData()) {
		t.Fatal("CAData holds no certificate")
	}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, TLSClientConfig: &tls.Config{RootCAs: pool}}}
	defer client.CloseIdleConnections()
	do := func(timeout time.Duration, method, path, user, body string) (int, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, method, k.Host()+path, strings.NewReader(body))
		if err != nil {
			return 0, err
		}
		req.Header.Set("Authorization", "Bearer "+k.Token(user))
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, nil
	}
	want := func(code int, method, path, user, body string) {
		t.Helper()
		got, err := do(20*time.Second, method, path, user, body)
		if err != nil || got != code {
			t.Fatalf("%s %s as %s: %d, %v; want %d", method, path, user, got, err, code)
		}
	}
	ns := `{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"kept"}}`
	want(http.StatusCreated, "POST", "/api/v1/namespaces", KubeAdmin, ns)
	want(http.StatusForbidden, "GET", "/api/v1/namespaces/kept", "alice", "")
	want(http.StatusOK, "GET", "/readyz", "alice", "")

	k.Pause()
	if _, err := do(time.Second, "GET", "/readyz", KubeAdmin, ""); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("paused API server answered: %v", err)
	}
	k.Resume()
	want(http.StatusOK, "GET", "/readyz", KubeAdmin, "")

	host := k.Host()
	k.Stop()
	if _, err := do(5*time.Second, "GET", "/readyz", KubeAdmin, ""); err == nil {
		t.Error("stopped API server answered")
	}
	k.Start()
	if k.Host() != host {
		t.Errorf("restarted on %s, was %s", k.Host(), host)
	}
	want(http.StatusOK, "GET", "/api/v1/namespaces/kept", KubeAdmin, "")

	k.Restart(true)
	want(http.StatusNotFound, "GET", "/api/v1/namespaces/kept", KubeAdmin, "")

	kc, err := os.ReadFile(k.WriteKubeconfig("alice", "team-a"))
	if err != nil || !strings.Contains(string(kc), "namespace: team-a") || !strings.Contains(string(kc), k.Token("alice")) {
		t.Fatalf("kubeconfig: %v\n%s", err, kc)
	}
}
