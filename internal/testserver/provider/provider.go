// Package provider chooses where the conformance harnesses' servers run:
// as child processes of the test (package testserver, the default) or in
// Docker containers through testcontainers-go (package
// testserver/containers), by the environment variable
//
//	ROLLCALL_TEST_SERVERS=local       (or unset) child processes
//	ROLLCALL_TEST_SERVERS=containers  containers; images per ROLLCALL_<SERVER>_IMAGE
//
// Both give the same methods, so a harness holds the interface and calls
// StartEtcd, StartConsul, StartKube or StartNacos instead of the testserver
// or nacosserver function. Methods call
// t.Fatal on failure: call them from the test's goroutine.
package provider

import (
	"os"
	"testing"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/model"

	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/internal/testserver/containers"
	"github.com/rollcall-go/rollcall/internal/testserver/nacosserver"
)

// Etcd is a single-member etcd cluster for a test.
type Etcd interface {
	// Endpoint returns the client address, 127.0.0.1:port.
	Endpoint() string
	// Pause freezes the server (SIGSTOP, or docker pause); Resume undoes it.
	Pause()
	Resume()
	// Stop kills the server, keeping its data; Start starts it again on
	// the same address; Wipe (while stopped) drops its data.
	Stop()
	Start()
	Wipe()
	Restart(wipe bool)
}

// Consul is a single-server Consul agent for a test whose state survives
// Stop and Start (testserver.StartConsulServer, or a container).
type Consul interface {
	// Addr returns the address of the HTTP API, 127.0.0.1:port.
	Addr() string
	Pause()
	Resume()
	Stop()
	Start()
	Wipe()
}

// Kube is a kube-apiserver with an etcd of its own, for a test
// (testserver.Kube, or a container of each).
type Kube interface {
	// Host returns the API server's URL, https://127.0.0.1:port.
	Host() string
	// CAData returns the PEM certificate of the CA of the serving
	// certificate; Token the bearer token of KubeAdmin or a user of
	// KubeOptions; WriteKubeconfig a kubeconfig file for user.
	CAData() []byte
	Token(user string) string
	WriteKubeconfig(user, namespace string) string
	// Pause, Resume, Stop and Start act on the API server (etcd keeps
	// running); Restart(true) also empties etcd.
	Pause()
	Resume()
	Stop()
	Start()
	Restart(wipe bool)
	Running() bool
}

// Nacos is a Nacos 2.x naming server for a test: the project's protocol
// server, in process (nacosserver.Start) or in a container of its own
// command (containers.StartNacos).
type Nacos interface {
	// Addr is the host:port to configure the SDK with (gRPC is port+1000).
	Addr() string
	Pause()
	Resume()
	Stop()
	Start()
	Restart(wipe bool)
	SetPushDelay(time.Duration)
	DropConnections() int
	Inject(namespace, group, service string, inst model.Instance)
}

var (
	_ Nacos  = (*nacosserver.Server)(nil)
	_ Nacos  = (*containers.Nacos)(nil)
	_ Kube   = (*testserver.Kube)(nil)
	_ Kube   = (*containers.Kube)(nil)
	_ Etcd   = (*testserver.Etcd)(nil)
	_ Etcd   = (*containers.Etcd)(nil)
	_ Consul = (*testserver.ConsulServer)(nil)
	_ Consul = (*containers.Consul)(nil)
)

// Containers reports whether the servers run in containers. A value of
// ROLLCALL_TEST_SERVERS other than "", "local" and "containers" fails the
// test.
func Containers(t testing.TB) bool {
	t.Helper()
	switch v := os.Getenv(containers.EnvServers); v {
	case "", "local":
		return false
	case containers.Provider:
		return true
	default:
		t.Fatalf("%s=%q: want %q (child processes, the default) or %q", containers.EnvServers, v, "local", containers.Provider)
		return false
	}
}

// StartEtcd starts etcd and waits until it serves requests; it is stopped
// and removed when the test ends.
func StartEtcd(t testing.TB) Etcd {
	t.Helper()
	if Containers(t) {
		return containers.StartEtcd(t)
	}
	return testserver.StartEtcd(t)
}

// StartConsul starts a persistent single-server Consul agent and waits until
// it has a leader; it is stopped and removed when the test ends.
func StartConsul(t testing.TB) Consul {
	t.Helper()
	if Containers(t) {
		return containers.StartConsul(t)
	}
	return testserver.StartConsulServer(t)
}

// StartKube starts etcd and kube-apiserver and waits until the API server
// is ready; they are stopped and removed when the test ends.
func StartKube(t testing.TB, opts *testserver.KubeOptions) Kube {
	t.Helper()
	if Containers(t) {
		var users []string
		if opts != nil {
			users = opts.Users
		}
		return containers.StartKube(t, users)
	}
	return testserver.StartKube(t, opts)
}

// StartNacos starts a Nacos 2.x protocol server; it is stopped and removed
// when the test ends. In a container, a stopped server starts again empty
// (the in-process one keeps the injected instances).
func StartNacos(t testing.TB) Nacos {
	t.Helper()
	if Containers(t) {
		return containers.StartNacos(t)
	}
	return nacosserver.Start(t)
}
