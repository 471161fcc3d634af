package testserver

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
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
	t      testing.TB
	etcd   *Etcd
	dir    string
	port   int
	proc   *child
	ca     []byte
	tokens map[string]string
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
	k := &Kube{t: t, dir: dir, tokens: map[string]string{}}
	k.etcd = StartEtcd(t)
	if err := k.writeFiles(o.Users); err != nil {
		t.Fatalf("testserver: kube-apiserver: %v", err)
	}
	k.proc = newChild(t, "kube-apiserver", bin, filepath.Join(dir, "kube-apiserver.log"))
	for attempt := 1; ; attempt++ {
		ports, err := freePorts(1)
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
func (k *Kube) CAData() []byte { return bytes.Clone(k.ca) }

// Token returns the bearer token of a user: KubeAdmin or one of
// KubeOptions.Users.
func (k *Kube) Token(user string) string {
	k.t.Helper()
	tok, ok := k.tokens[user]
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
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: %s\n", k.Host())
	fmt.Fprintf(&b, "    certificate-authority-data: %s\n", base64.StdEncoding.EncodeToString(k.ca))
	fmt.Fprintf(&b, "users:\n- name: %s\n  user:\n    token: %s\n", user, k.Token(user))
	fmt.Fprintf(&b, "contexts:\n- name: test\n  context:\n    cluster: test\n    user: %s\n    namespace: %s\n", user, namespace)
	b.WriteString("current-context: test\n")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
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
		TLSClientConfig:   &tls.Config{RootCAs: k.pool(), MinVersion: tls.VersionTLS12},
	}}
	defer client.CloseIdleConnections()
	url := k.Host() + "/readyz"
	return k.proc.waitReady(func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+k.tokens[KubeAdmin])
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

func (k *Kube) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AppendCertsFromPEM(k.ca)
	return p
}

// writeFiles writes the CA, the serving certificate, the service-account
// key pair and the token file.
func (k *Kube) writeFiles(users []string) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "rollcall-test-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(48 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	k.ca = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(48 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	saDER, err := x509.MarshalECPrivateKey(saKey)
	if err != nil {
		return err
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return err
	}
	k.tokens[KubeAdmin] = randomToken()
	var csv strings.Builder
	fmt.Fprintf(&csv, "%s,%s,%s,\"system:masters\"\n", k.tokens[KubeAdmin], KubeAdmin, KubeAdmin)
	for _, u := range users {
		if u == KubeAdmin || strings.ContainsAny(u, ",\"\n") || slices.Contains(users[:slices.Index(users, u)], u) {
			return fmt.Errorf("bad or duplicate user %q", u)
		}
		k.tokens[u] = randomToken()
		fmt.Fprintf(&csv, "%s,%s,%s\n", k.tokens[u], u, u)
	}
	files := map[string][]byte{
		"serving.crt": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		"serving.key": pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		"sa.key":      pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: saDER}),
		"sa.pub":      pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}),
		"tokens.csv":  []byte(csv.String()),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(k.dir, name), data, 0o600); err != nil {
			return err
		}
	}
	return os.MkdirAll(filepath.Join(k.dir, "certs"), 0o700)
}

func randomToken() string {
	b := make([]byte, 24)
	_, _ = rand.Read(b) // never fails
	return hex.EncodeToString(b)
}
