package testserver

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"slices"
	"strings"
	"time"
)

// KubeCredentials are what a test kube-apiserver needs, shared by the child
// process (StartKube) and the container (package containers) forms: a CA, a
// serving certificate for 127.0.0.1 and localhost, a service-account key
// pair, and a static bearer token per user (KubeAdmin is in system:masters).
type KubeCredentials struct {
	CA     []byte            // PEM certificate of the CA
	Files  map[string][]byte // serving.crt, serving.key, sa.key, sa.pub, tokens.csv
	Tokens map[string]string // user → bearer token
}

// NewKubeCredentials makes credentials for KubeAdmin and users.
func NewKubeCredentials(users []string) (*KubeCredentials, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
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
		return nil, err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
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
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	saDER, err := x509.MarshalECPrivateKey(saKey)
	if err != nil {
		return nil, err
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	tokens := map[string]string{KubeAdmin: randomToken()}
	var csv strings.Builder
	fmt.Fprintf(&csv, "%s,%s,%s,\"system:masters\"\n", tokens[KubeAdmin], KubeAdmin, KubeAdmin)
	for i, u := range users {
		if u == KubeAdmin || strings.ContainsAny(u, ",\"\n") || slices.Contains(users[:i], u) {
			return nil, fmt.Errorf("bad or duplicate user %q", u)
		}
		tokens[u] = randomToken()
		fmt.Fprintf(&csv, "%s,%s,%s\n", tokens[u], u, u)
	}
	return &KubeCredentials{
		CA: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		Files: map[string][]byte{
			"serving.crt": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			"serving.key": pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
			"sa.key":      pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: saDER}),
			"sa.pub":      pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}),
			"tokens.csv":  []byte(csv.String()),
		},
		Tokens: tokens,
	}, nil
}

// Pool returns a certificate pool holding the CA.
func (c *KubeCredentials) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AppendCertsFromPEM(c.CA)
	return p
}

// Kubeconfig returns a kubeconfig for user at host, with namespace as the
// context's namespace.
func (c *KubeCredentials) Kubeconfig(host, user, namespace string) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: %s\n", host)
	fmt.Fprintf(&b, "    certificate-authority-data: %s\n", base64.StdEncoding.EncodeToString(c.CA))
	fmt.Fprintf(&b, "users:\n- name: %s\n  user:\n    token: %s\n", user, c.Tokens[user])
	fmt.Fprintf(&b, "contexts:\n- name: test\n  context:\n    cluster: test\n    user: %s\n    namespace: %s\n", user, namespace)
	b.WriteString("current-context: test\n")
	return []byte(b.String())
}

func randomToken() string {
	b := make([]byte, 24)
	_, _ = rand.Read(b) // never fails
	return hex.EncodeToString(b)
}

// FreePorts returns n distinct TCP ports that were free on 127.0.0.1.
func FreePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("testserver: free port: %w", err)
		}
		defer l.Close() // held until all are chosen, so they differ
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// probeClient makes one request per connection, so that no idle connection
// (and its goroutines) outlives a probe.
var probeClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

// HTTPGet is a readiness probe: GET url, the body if the status is 200 OK.
func HTTPGet(ctx context.Context, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := probeClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return body, fmt.Errorf("%s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
}
