package containers

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/moby/moby/api/types/container"
	"github.com/testcontainers/testcontainers-go"
	tcnetwork "github.com/testcontainers/testcontainers-go/network"
)

// KubePort is kube-apiserver's secure port in the container.
const KubePort = "6443/tcp"

// KubeAdmin is the user of Kube.Token that is in the system:masters group
// (the same name as testserver.KubeAdmin).
const KubeAdmin = "rollcall-admin"

// Kube is a kube-apiserver in a container with an etcd in another, on a
// network of their own, with the methods of testserver.Kube: the API server
// serves HTTPS on 127.0.0.1 with a certificate from a CA made for the test
// (CAData) and authenticates users by bearer token (Token); KubeAdmin is in
// system:masters, the other users have no permissions (RBAC is on). As with
// testserver.Kube, no controller runs.
//
// Pause, Stop and Start act on the API server's container; Restart(true)
// also replaces etcd's container by a fresh one (the cluster's data is
// gone; the CA and tokens stay).
type Kube struct {
	*Server
	etcd  *Etcd
	dir   string
	creds *testserver.KubeCredentials
}

// StartKube starts etcd and kube-apiserver (image Image("kube-apiserver"),
// the binary at /usr/local/bin/kube-apiserver as in the official image) and
// waits until the API server is ready. users are made known to the API
// server, each with a bearer token and in no group but
// system:authenticated. The containers and their network are removed when
// the test ends.
func StartKube(t testing.TB, users []string) *Kube {
	t.Helper()
	k := &Kube{dir: t.TempDir()}
	creds, err := testserver.NewKubeCredentials(users)
	k.creds = creds
	if err != nil {
		t.Fatalf("containers: kube-apiserver: %v", err)
	}
	nw := NewNetwork(t)
	k.etcd = StartEtcd(t)
	k.etcd.Connect(nw, "etcd")
	k.Server = &Server{
		t:     t,
		name:  "kube-apiserver",
		image: Image("kube-apiserver"),
		ports: []string{KubePort},
		customize: func(s *Server) []testcontainers.ContainerCustomizer {
			var cf []testcontainers.ContainerFile
			for name, data := range creds.Files {
				cf = append(cf, testcontainers.ContainerFile{
					Reader: bytes.NewReader(data), ContainerFilePath: "/etc/rollcall/" + name, FileMode: 0o600,
				})
			}
			return []testcontainers.ContainerCustomizer{
				// Its only network: etcd is there, and its port is published
				// from there.
				tcnetwork.WithNetwork(nil, nw.nw),
				testcontainers.WithFiles(cf...),
				testcontainers.WithEntrypoint("/usr/local/bin/kube-apiserver"),
				// The flags of testserver.Kube.
				testcontainers.WithCmd(
					"--etcd-servers=http://etcd:2379",
					"--bind-address=0.0.0.0",
					"--secure-port=6443",
					"--advertise-address=127.0.0.1",
					"--endpoint-reconciler-type=none",
					"--tls-cert-file=/etc/rollcall/serving.crt",
					"--tls-private-key-file=/etc/rollcall/serving.key",
					"--cert-dir=/etc/rollcall/certs",
					"--token-auth-file=/etc/rollcall/tokens.csv",
					"--authorization-mode=RBAC",
					"--service-cluster-ip-range=10.0.0.0/24",
					"--service-account-issuer="+k.Host(),
					"--service-account-key-file=/etc/rollcall/sa.pub",
					"--service-account-signing-key-file=/etc/rollcall/sa.key",
					"--disable-admission-plugins=ServiceAccount",
					"--allow-privileged=true",
					"--enable-priority-and-fairness=false",
					"--profiling=false",
				),
				testcontainers.WithConfigModifier(func(c *container.Config) { c.User = "0:0" }),
			}
		},
		probe: func(ctx context.Context, s *Server) error {
			client := &http.Client{Transport: &http.Transport{
				DisableKeepAlives: true,
				TLSClientConfig:   &tls.Config{RootCAs: k.creds.Pool(), MinVersion: tls.VersionTLS12},
			}}
			defer client.CloseIdleConnections()
			url := k.Host() + "/readyz"
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
				return fmt.Errorf("%s: %s: %s", url, resp.Status, bytes.TrimSpace(body))
			}
			return nil
		},
	}
	k.start()
	return k
}

// Host returns the API server's URL, https://127.0.0.1:port.
func (k *Kube) Host() string { return "https://" + k.HostPort(KubePort) }

// CAData returns the PEM certificate of the CA that signed the API server's
// serving certificate.
func (k *Kube) CAData() []byte { return bytes.Clone(k.creds.CA) }

// Token returns the bearer token of a user: KubeAdmin or one of the users
// given to StartKube.
func (k *Kube) Token(user string) string {
	k.t.Helper()
	tok, ok := k.creds.Tokens[user]
	if !ok {
		k.t.Fatalf("containers: kube-apiserver: no user %q", user)
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
		k.t.Fatalf("containers: kubeconfig: %v", err)
	}
	return path
}

// Restart stops the API server; with wipe, it also replaces etcd by a fresh
// one, so that the API server starts on an empty cluster (which it
// bootstraps again: default namespaces, RBAC roles); then it starts the API
// server again.
func (k *Kube) Restart(wipe bool) {
	k.t.Helper()
	if k.running {
		k.Stop()
	}
	if wipe {
		k.etcd.Restart(true)
	}
	k.Start()
}

// Running reports whether the API server's container is running (started
// and not stopped).
func (k *Kube) Running() bool { return k.running }
