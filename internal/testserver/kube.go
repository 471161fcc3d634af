package testserver

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// KubeAdmin is the user of Kube.Token that is in the system:masters group.
const KubeAdmin = "rollcall-admin"

// Kube is a kube-apiserver with an etcd of its own, both child processes of
// the test, on 127.0.0.1. The API server serves HTTPS on a port chosen free
// at the first start and kept across restarts, with a certificate from a
// CA made for the test (CAData), and authenticates users by bearer token
// (Token): KubeAdmin is in system:masters, the users given in KubeOptions
// have no permissions until a test grants them some (RBAC is on).
//
// No controller runs (no kube-controller-manager): nothing garbage-collects
// owned objects, no namespace is finalized, no EndpointSlice is written for a
// Service. The flags follow controller-runtime's envtest, plus
// --advertise-address=127.0.0.1 and --endpoint-reconciler-type=none, which
// kube-apiserver 1.37 needs on loopback.
//
// Its methods call t.Fatal on failure, so call them from the test's goroutine.
type Kube struct {
	t     testing.TB
	etcd  *Etcd
	dir   string
	port  int
	proc  *child
	creds *KubeCredentials
}

// KubeOptions configure StartKube.
type KubeOptions struct {
	// Users are made known to the API server, each with a bearer token and
	// in no group but system:authenticated.
	Users []string
}

// StartKube starts etcd and kube-apiserver and waits until the API server
// is ready. Both processes are killed, and waited for, when the test ends.
func StartKube(t testing.TB, opts *KubeOptions) *Kube {
	t.Helper()
	bin, err := Binary("kube-apiserver")
	if err != nil {
		t.Fatal(err)
	}
	var o KubeOptions
	if opts != nil {
		o = *opts
	}
	dir := t.TempDir()
	k := &Kube{t: t, dir: dir}
	k.etcd = StartEtcd(t)
	if err := k.writeCredentials(o.Users); err != nil {
		t.Fatalf("testserver: kube-apiserver: %v", err)
	}
	k.proc = newChild(t, "kube-apiserver", bin, filepath.Join(dir, "kube-apiserver.log"))
	for attempt := 1; ; attempt++ {
		ports, err := FreePorts(1)
		if err != nil {
			t.Fatal(err)
		}
		k.port = ports[0]
		err = k.start()
		if err == nil {
			return k
		}
		if attempt < 3 && errors.Is(err, errAddrInUse) {
			t.Logf("testserver: kube-apiserver: %v; retrying on another port", err)
			continue
		}
		k.proc.logTail(t)
		t.Fatalf("testserver: kube-apiserver did not start: %v", err)
	}
}

// Host returns the API server's URL, https://127.0.0.1:port.
func (k *Kube) Host() string {
	return "https://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(k.port))
}

// CAData returns the PEM certificate of the CA that signed the API server's
// serving certificate.
func (k *Kube) CAData() []byte { return bytes.Clone(k.creds.CA) }

// Token returns the bearer token of a user: KubeAdmin or one of
// KubeOptions.Users.
func (k *Kube) Token(user string) string {
	k.t.Helper()
	tok, ok := k.creds.Tokens[user]
	if !ok {
		k.t.Fatalf("testserver: kube-apiserver: no user %q", user)
	}
	return tok
}

// Etcd returns the API server's etcd.
func (k *Kube) Etcd() *Etcd { return k.etcd }

// WriteKubeconfig writes a kubeconfig file for user, with namespace as the
// context's namespace, and returns its path (in the test's temporary
// directory).
func (k *Kube) WriteKubeconfig(user, namespace string) string {
	k.t.Helper()
	path := filepath.Join(k.dir, "kubeconfig-"+user+"-"+namespace)
	if err := os.WriteFile(path, k.creds.Kubeconfig(k.Host(), user, namespace), 0o600); err != nil {
		k.t.Fatalf("testserver: kubeconfig: %v", err)
	}
	return path
}

// Pause stops the API server with SIGSTOP: connections stay open, nothing
// answers. etcd keeps running.
func (k *Kube) Pause() {
	k.t.Helper()
	if err := k.proc.signal(syscall.SIGSTOP); err != nil {
		k.t.Fatalf("testserver: kube-apiserver: pause: %v", err)
	}
}

// Resume continues a paused API server with SIGCONT.
func (k *Kube) Resume() {
	k.t.Helper()
	if err := k.proc.signal(syscall.SIGCONT); err != nil {
		k.t.Fatalf("testserver: kube-apiserver: resume: %v", err)
	}
}

// Stop kills the API server with SIGKILL and waits for it to exit. etcd,
// and so the data, stay.
func (k *Kube) Stop() {
	k.t.Helper()
	if !k.proc.kill() {
		k.t.Fatal("testserver: kube-apiserver: Stop: not running")
	}
}

// Start starts a stopped API server again, on the same port with the same
// etcd, and waits until it is ready.
func (k *Kube) Start() {
	k.t.Helper()
	if err := k.start(); err != nil {
		k.proc.logTail(k.t)
		k.t.Fatalf("testserver: kube-apiserver did not start: %v", err)
	}
}

// Restart stops the API server; with wipe, it also restarts etcd with an
// empty data directory, so that the API server starts on an empty cluster
// (which it bootstraps again: default namespaces, RBAC roles); then it starts
// the API server again.
func (k *Kube) Restart(wipe bool) {
	k.t.Helper()
	if k.proc.running() {
		k.Stop()
	}
	if wipe {
		k.etcd.Restart(true)
	}
	k.Start()
}

// Running reports whether the API server process was started and not
// stopped.
func (k *Kube) Running() bool { return k.proc.running() }

func (k *Kube) start() error {
	d := k.dir
	args := []string{
		"--etcd-servers=http://" + k.etcd.Endpoint(),
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(k.port),
		"--advertise-address=127.0.0.1",
		"--endpoint-reconciler-type=none",
		"--tls-cert-file=" + filepath.Join(d, "serving.crt"),
		"--tls-private-key-file=" + filepath.Join(d, "serving.key"),
		"--cert-dir=" + filepath.Join(d, "certs"),
		"--token-auth-file=" + filepath.Join(d, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-cluster-ip-range=10.0.0.0/24",
		"--service-account-issuer=" + k.Host(),
		"--service-account-key-file=" + filepath.Join(d, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(d, "sa.key"),
		"--disable-admission-plugins=ServiceAccount",
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
	}
	// The API server reads KUBECONFIG-like variables of its own; keep the
	// developer's cluster settings out.
	env := filterEnv(os.Environ(), "KUBE")
	if err := k.proc.start(args, env); err != nil {
		return err
	}
	client := &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true,
		TLSClientConfig:   &tls.Config{RootCAs: k.creds.Pool(), MinVersion: tls.VersionTLS12},
	}}
	defer client.CloseIdleConnections()
	url := k.Host() + "/readyz"
	return k.proc.waitReady(func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+k.creds.Tokens[KubeAdmin])
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s: %s", url, resp.Status, lastLines(string(body), 5))
		}
		return nil
	})
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// writeCredentials makes the credentials and writes their files into dir.
func (k *Kube) writeCredentials(users []string) error {
	creds, err := NewKubeCredentials(users)
	if err != nil {
		return err
	}
	k.creds = creds
	for name, data := range creds.Files {
		if err := os.WriteFile(filepath.Join(k.dir, name), data, 0o600); err != nil {
			return err
		}
	}
	return os.MkdirAll(filepath.Join(k.dir, "certs"), 0o700)
}
