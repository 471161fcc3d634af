package testserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// readyTimeout bounds how long a server may take to become ready after it is
// started. Generous, because the tests may share two cores with compilers.
const readyTimeout = 60 * time.Second

// Etcd is a single-member etcd cluster running as a child process of the test,
// listening on 127.0.0.1 (client and peer ports chosen free at the first start
// and kept across restarts) with its data in a directory under t.TempDir().
//
// Its methods call t.Fatal on failure, so call them from the test's goroutine.
type Etcd struct {
	t       testing.TB
	dataDir string
	client  int // client port
	peer    int // peer port
	proc    *child

	// Of a member of an EtcdCluster: its name and the cluster's members.
	paused atomic.Bool // between Pause and Resume

	name    string
	cluster string
	timing  []string // heartbeat and election flags
}

// StartEtcd starts etcd and waits until it serves requests. The process is
// killed, and waited for, when the test ends.
func StartEtcd(t testing.TB) *Etcd {
	t.Helper()
	bin, err := Binary("etcd")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	e := &Etcd{t: t, dataDir: filepath.Join(dir, "data")}
	e.proc = newChild(t, "etcd", bin, filepath.Join(dir, "etcd.log"))
	// A port found free can be taken by someone else before etcd binds it:
	// on the first start only, retry with other ports.
	for attempt := 1; ; attempt++ {
		ports, err := FreePorts(2)
		if err != nil {
			t.Fatal(err)
		}
		e.client, e.peer = ports[0], ports[1]
		err = e.start()
		if err == nil {
			return e
		}
		if attempt < 3 && errors.Is(err, errAddrInUse) {
			t.Logf("testserver: etcd: %v; retrying on other ports", err)
			continue
		}
		e.proc.logTail(t)
		t.Fatalf("testserver: etcd did not start: %v", err)
	}
}

// Endpoint returns the client address, host:port.
func (e *Etcd) Endpoint() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(e.client))
}

// Pause stops the process with SIGSTOP: connections stay open, nothing answers.
func (e *Etcd) Pause() {
	e.t.Helper()
	if err := e.proc.signal(syscall.SIGSTOP); err != nil {
		e.t.Fatalf("testserver: etcd: pause: %v", err)
	}
	e.paused.Store(true)
}

// Resume continues a paused process with SIGCONT.
func (e *Etcd) Resume() {
	e.t.Helper()
	if err := e.proc.signal(syscall.SIGCONT); err != nil {
		e.t.Fatalf("testserver: etcd: resume: %v", err)
	}
	e.paused.Store(false)
}

// Stop kills the process with SIGKILL and waits for it to exit. The data
// directory is kept: Start brings the same data back.
func (e *Etcd) Stop() {
	e.t.Helper()
	if !e.proc.kill() {
		e.t.Fatal("testserver: etcd: Stop: not running")
	}
}

// Start starts a stopped etcd again, on the same ports and data directory, and
// waits until it serves requests.
func (e *Etcd) Start() {
	e.t.Helper()
	if err := e.start(); err != nil {
		e.proc.logTail(e.t)
		e.t.Fatalf("testserver: etcd did not start: %v", err)
	}
}

// Wipe removes the data directory of a stopped etcd, so that the next Start
// begins with an empty cluster.
func (e *Etcd) Wipe() {
	e.t.Helper()
	if e.proc.running() {
		e.t.Fatal("testserver: etcd: Wipe while running; Stop first")
	}
	if err := os.RemoveAll(e.dataDir); err != nil {
		e.t.Fatalf("testserver: etcd: wipe: %v", err)
	}
}

// Restart stops etcd, removes its data if wipe is true, and starts it again.
func (e *Etcd) Restart(wipe bool) {
	e.t.Helper()
	e.Stop()
	if wipe {
		e.Wipe()
	}
	e.Start()
}

func (e *Etcd) start() error {
	if err := e.launch(); err != nil {
		return err
	}
	return e.waitReady()
}

func (e *Etcd) peerURL() string {
	return "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(e.peer))
}

// launch starts the process.
func (e *Etcd) launch() error {
	peerURL := e.peerURL()
	clientURL := "http://" + e.Endpoint()
	name, cluster := e.name, e.cluster
	if name == "" {
		name, cluster = "default", "default="+peerURL
	}
	timing := e.timing
	if timing == nil {
		timing = []string{"--heartbeat-interval=50", "--election-timeout=500"}
	}
	args := []string{
		"--name=" + name,
		"--data-dir=" + e.dataDir,
		"--listen-client-urls=" + clientURL,
		"--advertise-client-urls=" + clientURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=" + cluster,
		"--initial-cluster-state=new",
		"--initial-cluster-token=rollcall-test",
		// Small and fast: tests keep little data and need no durability
		// beyond the page cache (SIGKILL keeps what was written).
		"--snapshot-count=1000",
		"--unsafe-no-fsync",
		"--quota-backend-bytes=" + strconv.Itoa(256<<20),
		"--log-level=info",
	}
	args = append(args, timing...)
	// etcd reads ETCD_* variables as flags; keep the developer's out.
	env := filterEnv(os.Environ(), "ETCD_")
	return e.proc.start(args, env)
}

// waitReady waits until the member reports itself healthy (it serves
// requests: its cluster has a leader).
func (e *Etcd) waitReady() error {
	health := "http://" + e.Endpoint() + "/health"
	return e.proc.waitReady(func(ctx context.Context) error {
		body, err := HTTPGet(ctx, health)
		if err != nil {
			return err
		}
		if !bytes.Contains(body, []byte(`"health":"true"`)) {
			return fmt.Errorf("not healthy: %s", bytes.TrimSpace(body))
		}
		return nil
	})
}

// child is a server process started by this package. Only the process it
// started is ever signalled, by its PID.
type child struct {
	name    string
	bin     string
	logPath string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed once cmd.Wait has returned
}

func newChild(t testing.TB, name, bin, logPath string) *child {
	c := &child{name: name, bin: bin, logPath: logPath}
	t.Cleanup(func() {
		c.kill()
		if t.Failed() {
			c.logTail(t)
		}
	})
	return c
}

// start starts the process, with stdout and stderr appended to the log file.
func (c *child) start(args, env []string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd != nil {
		return fmt.Errorf("%s is already running (pid %d)", c.name, c.cmd.Process.Pid)
	}
	log, err := os.OpenFile(c.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(log, "=== testserver %s: %s %s\n", time.Now().Format(time.RFC3339Nano), c.bin, strings.Join(args, " "))
	cmd := exec.Command(c.bin, args...)
	cmd.Env = env
	cmd.Stdout = log // an *os.File: no copying goroutine
	cmd.Stderr = log
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	setParentDeathSignal(cmd.SysProcAttr)
	if err := cmd.Start(); err != nil {
		log.Close()
		return err
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait() // the exit status of a killed server is of no interest
		log.Close()
		close(done)
	}()
	c.cmd, c.done = cmd, done
	return nil
}

// running reports whether the process was started and has not been killed.
// A process that exited by itself still counts until kill is called.
func (c *child) running() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cmd != nil
}

// signal sends sig to the process. For SIGSTOP and SIGCONT, which the kernel
// delivers asynchronously, it also waits until every thread of the process has
// stopped, or none is stopped any more, so that a paused server answers no
// request sent after signal returns. (That wait reads /proc: Linux only.)
func (c *child) signal(sig syscall.Signal) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd == nil {
		return errors.New("not running")
	}
	select {
	case <-c.done:
		return fmt.Errorf("process %d has exited", c.cmd.Process.Pid)
	default:
	}
	if err := c.cmd.Process.Signal(sig); err != nil {
		return err
	}
	switch sig {
	case syscall.SIGSTOP:
		return waitStopState(c.cmd.Process.Pid, c.done, true)
	case syscall.SIGCONT:
		return waitStopState(c.cmd.Process.Pid, c.done, false)
	}
	return nil
}

// waitStopState polls /proc/PID/task/*/stat until all threads are stopped
// (stopped true) or none is (stopped false). Without /proc it returns at once.
func waitStopState(pid int, done <-chan struct{}, stopped bool) error {
	const timeout = 10 * time.Second
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		all, any, err := threadsStopped(pid)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil // no /proc, or the process has gone
			}
			return err
		}
		if (stopped && all) || (!stopped && !any) {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("process %d has exited", pid)
		case <-deadline.C:
			return fmt.Errorf("process %d: stopped state not %v after %v", pid, stopped, timeout)
		case <-tick.C:
		}
	}
}

// threadsStopped reports whether all, and whether any, of the threads of pid
// are in the stopped state ('T' in /proc/PID/task/TID/stat).
func threadsStopped(pid int) (all, any bool, err error) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	if err != nil {
		return false, false, err
	}
	if len(tasks) == 0 {
		return false, false, os.ErrNotExist
	}
	all = true
	for _, task := range tasks {
		b, err := os.ReadFile(task)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // a thread that just exited
			}
			return false, false, err
		}
		// "tid (comm) S ...": the state follows the last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 || i+2 >= len(b) {
			return false, false, fmt.Errorf("%s: unexpected contents %q", task, b)
		}
		if state := b[i+2]; state == 'T' || state == 't' {
			any = true
		} else {
			all = false
		}
	}
	return all, any, nil
}

// kill sends SIGKILL (which also ends a stopped process) and waits for the
// process to exit. It reports whether there was a process.
func (c *child) kill() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd == nil {
		return false
	}
	_ = c.cmd.Process.Kill() // fails only if it has already exited
	<-c.done
	c.cmd, c.done = nil, nil
	return true
}

// exited returns a channel closed when the current process has exited.
func (c *child) exited() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.done
}

var errAddrInUse = errors.New("address already in use")

// waitReady polls probe until it succeeds, the process exits, or readyTimeout
// passes; on failure it kills the process.
func (c *child) waitReady(probe func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	exited := c.exited()
	start := time.Now()
	interval := 10 * time.Millisecond
	timer := time.NewTimer(0)
	defer timer.Stop()
	var lastErr error
	for {
		select {
		case <-exited:
			c.kill()
			if bytes.Contains(c.readLog(), []byte("address already in use")) {
				return fmt.Errorf("%s exited: %w", c.name, errAddrInUse)
			}
			return fmt.Errorf("%s exited before it was ready (last probe: %v)", c.name, lastErr)
		case <-ctx.Done():
			c.kill()
			return fmt.Errorf("%s not ready after %v (last probe: %v)", c.name, time.Since(start).Round(time.Millisecond), lastErr)
		case <-timer.C:
		}
		pctx, pcancel := context.WithTimeout(ctx, time.Second)
		lastErr = probe(pctx)
		pcancel()
		if lastErr == nil {
			return nil
		}
		timer.Reset(interval)
		interval = min(2*interval, 200*time.Millisecond)
	}
}

func (c *child) readLog() []byte {
	b, _ := os.ReadFile(c.logPath)
	return b
}

// logTail writes the last lines of the process's output to the test log.
func (c *child) logTail(t testing.TB) {
	t.Helper()
	const maxLines = 40
	lines := strings.Split(strings.TrimRight(string(c.readLog()), "\n"), "\n")
	if len(lines) > maxLines {
		lines = lines[len(lines)-maxLines:]
	}
	t.Logf("testserver: last lines of %s:\n%s", c.logPath, strings.Join(lines, "\n"))
}

// setParentDeathSignal asks the kernel to SIGKILL the child when the test
// binary dies (say, on a -timeout panic), so that no server outlives it. Only
// Linux has SysProcAttr.Pdeathsig; elsewhere this does nothing.
func setParentDeathSignal(attr *syscall.SysProcAttr) {
	f := reflect.ValueOf(attr).Elem().FieldByName("Pdeathsig")
	if f.IsValid() && f.CanSet() && f.Type() == reflect.TypeOf(syscall.SIGKILL) {
		f.Set(reflect.ValueOf(syscall.SIGKILL))
	}
}

func filterEnv(env []string, prefix string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		if !strings.HasPrefix(kv, prefix) {
			out = append(out, kv)
		}
	}
	return out
}
