// Package containers runs the registry servers of the conformance harnesses
// in Docker containers, through testcontainers-go, with the fault controls of
// package testserver's child processes: Pause/Resume (docker pause, a frozen
// server whose connections stay open), Stop/Start (the container is killed
// and started again with its data), Wipe (the next Start runs a fresh
// container: the data is gone), and Connect/Disconnect of a user-defined
// network (a partition).
//
// It is chosen by ROLLCALL_TEST_SERVERS=containers (see package
// testserver/provider); the default stays the local child processes.
//
// Images are the servers' official images unless overridden by an
// environment variable per server (Image): on a machine without a registry,
// scripts/build-images.sh builds tiny local images FROM scratch out of the
// binaries scripts/build-servers.sh builds, and prints the variables that
// select them.
//
// Every published port binds 127.0.0.1 only, on a host port chosen free at
// the first start and kept across restarts and wipes, so that clients
// reconnect to the same address. This needs a Docker engine on the machine
// that runs the tests (not a remote DOCKER_HOST). Every container and
// network is removed by the test's cleanup; containers left behind by a test
// binary that died (no cleanup runs then, and Ryuk is normally disabled here)
// are removed by the next run on the same host. Every Docker call is bounded
// by a deadline.
//
// Methods call t.Fatal on failure: call them from the test's goroutine.
package containers

import (
	"context"
	"errors"
	"fmt"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
	tclog "github.com/testcontainers/testcontainers-go/log"
	tcnetwork "github.com/testcontainers/testcontainers-go/network"
	"github.com/testcontainers/testcontainers-go/wait"
)

// EnvServers is the environment variable that chooses the servers the
// harnesses test against: "containers" selects this package; "" or "local"
// the child processes of package testserver.
const EnvServers = "ROLLCALL_TEST_SERVERS"

// Provider is the value of EnvServers that selects containers.
const Provider = "containers"

// Selected reports whether EnvServers selects containers.
func Selected() bool { return os.Getenv(EnvServers) == Provider }

// Images maps each server to the environment variable that overrides its
// image and to its default, official image.
var Images = map[string]struct{ Env, Default string }{
	"etcd":      {"ROLLCALL_ETCD_IMAGE", "gcr.io/etcd-development/etcd:v3.6.16"},
	"consul":    {"ROLLCALL_CONSUL_IMAGE", "hashicorp/consul:1.16.3"},
	"toxiproxy": {"ROLLCALL_TOXIPROXY_IMAGE", "ghcr.io/shopify/toxiproxy:2.12.0"},
	// No default: the project's Nacos 2.x protocol server, whose image
	// scripts/build-images.sh builds (see StartNacos).
	"nacos": {"ROLLCALL_NACOS_IMAGE", ""},
	// The API server runs with an etcd container of its own (etcd's image).
	"kube-apiserver": {"ROLLCALL_KUBE_APISERVER_IMAGE", "registry.k8s.io/kube-apiserver:v1.37.1"},
}

// Image returns the image used for server name: the value of its
// environment variable, or its default.
func Image(name string) string {
	spec, ok := Images[name]
	if !ok {
		panic("containers: unknown server " + strconv.Quote(name))
	}
	if img := os.Getenv(spec.Env); img != "" {
		return img
	}
	return spec.Default // "" when there is none
}

const (
	// readyTimeout bounds how long a server may take to answer after its
	// container starts (the machine may be busy compiling).
	readyTimeout = 60 * time.Second
	// opTimeout bounds one Docker call (create, pause, stop, connect...).
	opTimeout = 60 * time.Second
	// pullTimeout bounds pulling an image that is not present.
	pullTimeout = 10 * time.Minute
)

// Labels on everything this package creates: the owner's host and PID, so
// that a later run can remove what a dead test binary left behind.
const (
	labelHost = "dev.rollcall.test.host"
	labelPID  = "dev.rollcall.test.pid"
)

func ownerLabels() map[string]string {
	host, _ := os.Hostname()
	return map[string]string{labelHost: host, labelPID: strconv.Itoa(os.Getpid())}
}

var setup sync.Once

// prepare runs once per test binary: testcontainers logs only with
// ROLLCALL_TEST_LOG, and containers of dead test binaries of this host are
// removed.
func prepare(t testing.TB) {
	setup.Do(func() {
		if os.Getenv("ROLLCALL_TEST_LOG") == "" {
			tclog.SetDefault(tclog.NewNoopLogger())
		}
		if err := withDocker(func(ctx context.Context, cli *testcontainers.DockerClient) error {
			return sweep(ctx, cli)
		}); err != nil {
			t.Logf("containers: removing leftovers of dead test binaries: %v", err)
		}
	})
}

// sweep removes the containers and networks labelled with this host and
// the PID of a process that no longer exists.
func sweep(ctx context.Context, cli *testcontainers.DockerClient) error {
	host, _ := os.Hostname()
	dead := func(labels map[string]string) bool {
		if labels[labelHost] != host {
			return false
		}
		pid, err := strconv.Atoi(labels[labelPID])
		if err != nil || pid <= 0 {
			return false
		}
		return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
	}
	filter := make(client.Filters).Add("label", labelPID)
	list, err := cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: filter})
	if err != nil {
		return err
	}
	var errs []error
	for _, c := range list.Items {
		if dead(c.Labels) {
			_, err := cli.ContainerRemove(ctx, c.ID, client.ContainerRemoveOptions{Force: true, RemoveVolumes: true})
			errs = append(errs, err)
		}
	}
	nets, err := cli.NetworkList(ctx, client.NetworkListOptions{Filters: filter})
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, n := range nets.Items {
		if dead(n.Labels) {
			_, err := cli.NetworkRemove(ctx, n.ID, client.NetworkRemoveOptions{})
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// withDocker calls fn with a Docker client and a context bounded by
// opTimeout, and closes the client (no idle connection outlives it).
func withDocker(fn func(ctx context.Context, cli *testcontainers.DockerClient) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	cli, err := testcontainers.NewDockerClientWithOpts(ctx)
	if err != nil {
		return fmt.Errorf("containers: docker: %w", err)
	}
	defer cli.Close()
	return fn(ctx, cli)
}

// ensureImage pulls img unless it is present, with a message that says what
// to do when it cannot be pulled.
func ensureImage(name, img string) error {
	err := withDocker(func(ctx context.Context, cli *testcontainers.DockerClient) error {
		_, err := cli.ImageInspect(ctx, img)
		return err
	})
	if err == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), pullTimeout)
	defer cancel()
	cli, err := testcontainers.NewDockerClientWithOpts(ctx)
	if err != nil {
		return fmt.Errorf("containers: docker: %w", err)
	}
	defer cli.Close()
	resp, err := cli.ImagePull(ctx, img, client.ImagePullOptions{})
	if err == nil {
		err = resp.Wait(ctx)
	}
	if err != nil {
		return fmt.Errorf("containers: image %s for %s is not present and cannot be pulled: %w "+
			"(without a registry, run scripts/build-images.sh and set %s to the local image it builds)",
			img, name, err, Images[name].Env)
	}
	return nil
}

// Server is one server in a container, with the fault controls. Etcd,
// Consul and Proxy embed it.
type Server struct {
	t     testing.TB
	name  string
	image string
	// ports are the container ports published on 127.0.0.1 ("2379/tcp");
	// hostPorts their host ports, fixed at the first start.
	ports     []string
	hostPorts map[string]int
	// customize returns the rest of the request (entrypoint, command,
	// networks); probe tells whether the server answers.
	customize func(s *Server) []testcontainers.ContainerCustomizer
	probe     func(ctx context.Context, s *Server) error
	// pickPorts chooses the host ports, one per port; freePorts when nil.
	pickPorts func() ([]int, error)
	// runner runs the container: testcontainers.Run, or a module's Run.
	runner func(ctx context.Context, img string, opts ...testcontainers.ContainerCustomizer) (*testcontainers.DockerContainer, error)

	ctr     *testcontainers.DockerContainer
	running bool
	paused  bool
	wiped   bool
	joined  []joined // networks joined by Connect, joined again after a wipe
}

type joined struct {
	net     *Network
	aliases []string
}

// start creates and starts the first container of s, retrying on other
// ports if it fails (a port found free may have been taken since).
func (s *Server) start() {
	s.t.Helper()
	prepare(s.t)
	if err := ensureImage(s.name, s.image); err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(s.terminate)
	var err error
	for attempt := 1; attempt <= 3; attempt++ {
		pick := s.pickPorts
		if pick == nil {
			pick = func() ([]int, error) { return testserver.FreePorts(len(s.ports)) }
		}
		ports, perr := pick()
		if perr != nil {
			s.t.Fatal(perr)
		}
		s.hostPorts = make(map[string]int, len(s.ports))
		for i, p := range s.ports {
			s.hostPorts[p] = ports[i]
		}
		if err = s.run(); err == nil {
			return
		}
		s.t.Logf("containers: %s: attempt %d: %v", s.name, attempt, err)
	}
	s.t.Fatalf("containers: %s (%s) did not start: %v", s.name, s.image, err)
}

// run creates and starts a container on s.hostPorts and waits until it
// answers. On failure the container is removed.
func (s *Server) run() error {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout+readyTimeout)
	defer cancel()
	logger := tclog.NewNoopLogger()
	if os.Getenv("ROLLCALL_TEST_LOG") != "" {
		logger = tclog.Default()
	}
	opts := []testcontainers.ContainerCustomizer{
		testcontainers.WithLogger(logger),
		testcontainers.WithExposedPorts(s.ports...),
		testcontainers.WithLabels(ownerLabels()),
		testcontainers.WithHostConfigModifier(func(hc *container.HostConfig) {
			hc.PortBindings = network.PortMap{}
			for _, p := range s.ports {
				port := network.MustParsePort(p)
				hc.PortBindings[port] = []network.PortBinding{{
					HostIP:   netip.MustParseAddr("127.0.0.1"),
					HostPort: strconv.Itoa(s.hostPorts[p]),
				}}
			}
		}),
		testcontainers.WithWaitStrategy(probeStrategy{s}),
	}
	opts = append(opts, s.customize(s)...)
	runner := s.runner
	if runner == nil {
		runner = testcontainers.Run
	}
	ctr, err := runner(ctx, s.image, opts...)
	if err != nil {
		if ctr != nil {
			s.remove(ctr)
		}
		return err
	}
	s.ctr, s.running, s.paused, s.wiped = ctr, true, false, false
	for _, j := range s.joined {
		if err := s.connect(j.net, j.aliases); err != nil {
			return err
		}
	}
	return nil
}

// terminate removes the container; it is the test's cleanup.
func (s *Server) terminate() {
	if s.ctr == nil {
		return
	}
	if s.paused {
		_ = withDocker(func(ctx context.Context, cli *testcontainers.DockerClient) error {
			_, err := cli.ContainerUnpause(ctx, s.ctr.GetContainerID(), client.ContainerUnpauseOptions{})
			return err
		})
	}
	s.remove(s.ctr)
	s.ctr = nil
}

func (s *Server) remove(ctr *testcontainers.DockerContainer) {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	if err := ctr.Terminate(ctx, testcontainers.StopTimeout(0)); err != nil {
		s.t.Errorf("containers: %s: removing container %s: %v", s.name, ctr.GetContainerID(), err)
	}
}

// HostPort returns the address on 127.0.0.1 where the container port (for
// example "2379/tcp") is published.
func (s *Server) HostPort(port string) string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.hostPorts[port]))
}

// ContainerID returns the ID of the current container.
func (s *Server) ContainerID() string { return s.ctr.GetContainerID() }

// Pause freezes every process of the container (docker pause): connections
// stay open, nothing answers.
func (s *Server) Pause() {
	s.t.Helper()
	s.docker("pause", func(ctx context.Context, cli *testcontainers.DockerClient) error {
		_, err := cli.ContainerPause(ctx, s.ctr.GetContainerID(), client.ContainerPauseOptions{})
		return err
	})
	s.paused = true
}

// Resume undoes Pause (docker unpause).
func (s *Server) Resume() {
	s.t.Helper()
	s.docker("unpause", func(ctx context.Context, cli *testcontainers.DockerClient) error {
		_, err := cli.ContainerUnpause(ctx, s.ctr.GetContainerID(), client.ContainerUnpauseOptions{})
		return err
	})
	s.paused = false
}

// Stop kills the container (docker stop -t 0) and waits until it has
// exited. Its file system, and so the server's data, is kept.
func (s *Server) Stop() {
	s.t.Helper()
	if !s.running {
		s.t.Fatalf("containers: %s: Stop: not running", s.name)
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	zero := time.Duration(0)
	if err := s.ctr.Stop(ctx, &zero); err != nil {
		s.t.Fatalf("containers: %s: stop: %v", s.name, err)
	}
	s.running, s.paused = false, false
}

// Wipe makes the next Start run a fresh container from the image, on the
// same host ports and networks: the data is gone. The server must be
// stopped.
func (s *Server) Wipe() {
	s.t.Helper()
	if s.running {
		s.t.Fatalf("containers: %s: Wipe while running; Stop first", s.name)
	}
	s.wiped = true
}

// Start starts a stopped server again, with its data unless Wipe was
// called, on the same host ports, and waits until it answers.
func (s *Server) Start() {
	s.t.Helper()
	if s.running {
		s.t.Fatalf("containers: %s: Start: already running", s.name)
	}
	if s.wiped {
		old := s.ctr
		s.ctr = nil
		s.remove(old)
		if err := s.run(); err != nil {
			s.t.Fatalf("containers: %s: fresh container did not start: %v", s.name, err)
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout+readyTimeout)
	defer cancel()
	if err := s.ctr.Start(ctx); err != nil {
		s.t.Fatalf("containers: %s: start: %v", s.name, err)
	}
	s.running = true
}

// Restart stops the server (if it runs), wipes its data if wipe is true,
// and starts it.
func (s *Server) Restart(wipe bool) {
	s.t.Helper()
	if s.running {
		s.Stop()
	}
	if wipe {
		s.Wipe()
	}
	s.Start()
}

// Connect attaches the container to n, where other containers reach it by
// the given aliases (docker network connect).
func (s *Server) Connect(n *Network, aliases ...string) {
	s.t.Helper()
	if err := s.connect(n, aliases); err != nil {
		s.t.Fatal(err)
	}
	for _, j := range s.joined {
		if j.net == n {
			return
		}
	}
	s.joined = append(s.joined, joined{n, aliases})
}

func (s *Server) connect(n *Network, aliases []string) error {
	return withDocker(func(ctx context.Context, cli *testcontainers.DockerClient) error {
		_, err := cli.NetworkConnect(ctx, n.ID(), client.NetworkConnectOptions{
			Container:      s.ctr.GetContainerID(),
			EndpointConfig: &network.EndpointSettings{Aliases: aliases},
		})
		if err != nil {
			return fmt.Errorf("containers: %s: connect to network %s: %w", s.name, n.Name(), err)
		}
		return nil
	})
}

// Disconnect detaches the container from n (docker network disconnect):
// the containers on n no longer reach it; connections through them hang.
func (s *Server) Disconnect(n *Network) {
	s.t.Helper()
	s.docker("disconnect from network "+n.Name(), func(ctx context.Context, cli *testcontainers.DockerClient) error {
		_, err := cli.NetworkDisconnect(ctx, n.ID(), client.NetworkDisconnectOptions{Container: s.ctr.GetContainerID(), Force: true})
		return err
	})
	for i, j := range s.joined {
		if j.net == n {
			s.joined = append(s.joined[:i], s.joined[i+1:]...)
			break
		}
	}
}

func (s *Server) docker(op string, fn func(ctx context.Context, cli *testcontainers.DockerClient) error) {
	s.t.Helper()
	if err := withDocker(fn); err != nil {
		s.t.Fatalf("containers: %s: %s: %v", s.name, op, err)
	}
}

// probeStrategy is the wait strategy of every container: s.probe polled
// until it succeeds, within readyTimeout.
type probeStrategy struct{ s *Server }

func (p probeStrategy) WaitUntilReady(ctx context.Context, target wait.StrategyTarget) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	interval := 10 * time.Millisecond
	timer := time.NewTimer(0)
	defer timer.Stop()
	var last error
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready after %v (last probe: %v)", p.s.name, readyTimeout, last)
		case <-timer.C:
		}
		if st, err := target.State(ctx); err == nil && !st.Running {
			return fmt.Errorf("%s exited before it was ready (exit code %d; last probe: %v)", p.s.name, st.ExitCode, last)
		}
		pctx, pcancel := context.WithTimeout(ctx, time.Second)
		last = p.s.probe(pctx, p.s)
		pcancel()
		if last == nil {
			return nil
		}
		timer.Reset(interval)
		interval = min(2*interval, 200*time.Millisecond)
	}
}

// Network is a user-defined Docker network, removed at the end of the test.
type Network struct {
	nw *testcontainers.DockerNetwork
}

// NewNetwork creates a bridge network.
func NewNetwork(t testing.TB) *Network {
	t.Helper()
	prepare(t)
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	nw, err := tcnetwork.New(ctx, tcnetwork.WithLabels(ownerLabels()))
	if err != nil {
		t.Fatalf("containers: network: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		defer cancel()
		if err := nw.Remove(ctx); err != nil {
			t.Errorf("containers: removing network %s: %v", nw.Name, err)
		}
	})
	return &Network{nw: nw}
}

// ID and Name return the network's ID and name.
func (n *Network) ID() string   { return n.nw.ID }
func (n *Network) Name() string { return n.nw.Name }

// probeClient makes one request per connection, so that no idle connection
// (and its goroutines) outlives a probe.
var probeClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
