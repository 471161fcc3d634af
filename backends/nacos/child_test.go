package nacos_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/conformance"
)

// nacos-sdk-go v2.3.5 has data races of its own on its reconnect path, which
// the race detector reports in whatever test is running (so that test fails
// whatever it asserts), found here and in internal/testserver/nacosserver:
//   - rpc_client.go:449 (reconnect writes RpcClient.currentConnection)
//     against rpc_client.go:487 (the event goroutine reads it to log the
//     DISCONNECTED event): on every reconnect that replaces a connection.
//   - rpc_client.go:592 (Request reads rpcClientStatus without atomics to
//     format "client not connected, current status:%s") against the atomic
//     updates of other requests and of the reconnect goroutine: whenever
//     requests run while the client is not connected.
//
// So, under -race, the tests that make the SDK reconnect (server paused,
// stopped, restarted, connections dropped, client closed under the
// registry's feet) run in a child test binary built without -race; every
// other test, and so every code path of this package that does not need a
// reconnect, runs under the race detector.

// childEnv marks a test process started by runWithoutRace.
const childEnv = "ROLLCALL_NACOS_NORACE_CHILD"

// errRaceSDK is what the harness's fault controls return under -race.
var errRaceSDK = fmt.Errorf("%w: under -race: this fault makes nacos-sdk-go v2.3.5 reconnect, and its reconnect path has data races "+
	"of its own (rpc_client.go:449 vs 487, 592); TestConformanceWithoutRace runs this property in a child test binary built without -race",
	conformance.ErrUnsupported)

// raceChild reports whether reconnecting faults must be refused: this binary
// has the race detector and is not the child.
func raceChild() bool { return raceEnabled && os.Getenv(childEnv) == "" }

var noRaceBinary struct {
	once sync.Once
	dir  string
	path string
	err  error
	out  []byte
}

// runWithoutRace runs the tests matching pattern in a child test binary built
// without -race, when this one was built with -race, and reports whether it
// did; the test fails if the child does.
func runWithoutRace(t *testing.T, pattern string) bool {
	t.Helper()
	if !raceChild() {
		return false
	}
	noRaceBinary.once.Do(buildNoRaceBinary)
	if noRaceBinary.err != nil {
		t.Fatalf("building the test binary without -race: %v\n%s", noRaceBinary.err, noRaceBinary.out)
	}
	start := time.Now()
	cmd := exec.Command(noRaceBinary.path, "-test.run", pattern, "-test.count=1", "-test.v", "-test.timeout=10m")
	cmd.Env = append(os.Environ(), childEnv+"=1")
	out, err := cmd.CombinedOutput()
	var summary []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "--- ") || strings.HasPrefix(l, "ok") || strings.HasPrefix(l, "FAIL") || strings.HasPrefix(l, "PASS") {
			summary = append(summary, l)
		}
	}
	if err != nil {
		t.Fatalf("%s failed in the child process built without -race: %v\n%s", pattern, err, out)
	}
	if !strings.Contains(string(out), "--- PASS") {
		t.Fatalf("the child process built without -race ran no test matching %s:\n%s", pattern, out)
	}
	t.Logf("ran %s in a child process built without -race (nacos-sdk-go races on reconnect), %v:\n%s",
		pattern, time.Since(start).Round(time.Millisecond), strings.Join(summary, "\n"))
	raceCheck(t, pattern)
	return true
}

// raceCheck runs the tests matching pattern once more, in this binary (built
// with -race) as a child whose faults make the SDK reconnect, and fails t on
// every data race report in which one of the two accesses is made by
// rollcall's code (this package, the shared layer, the tests). The SDK's own
// races, whose accesses are both in its code, are counted and ignored, and
// so are the child's verdicts (the race detector fails every test that is
// running when the SDK races): the verdicts are the child's built without
// -race. So rollcall's code on the reconnect path runs under the race
// detector too.
func raceCheck(t *testing.T, pattern string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	start := time.Now()
	cmd := exec.Command(exe, "-test.run", pattern, "-test.count=1", "-test.v", "-test.timeout=10m")
	cmd.Env = append(os.Environ(), childEnv+"=1", "GORACE=halt_on_error=0 log_path="+filepath.Join(dir, "race"))
	out, runErr := cmd.CombinedOutput()
	if !strings.Contains(string(out), "--- PASS") && !strings.Contains(string(out), "--- FAIL") {
		t.Fatalf("the race check of %s ran no test: %v\n%s", pattern, runErr, out)
	}
	files, err := filepath.Glob(filepath.Join(dir, "race.*"))
	if err != nil {
		t.Fatal(err)
	}
	var ours []string
	sdk := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, rep := range strings.Split(string(b), "==================\n") {
			if !strings.Contains(rep, "WARNING: DATA RACE") {
				continue
			}
			if racesInOurCode(rep) {
				ours = append(ours, rep)
			} else {
				sdk++
			}
		}
	}
	if len(ours) > 0 {
		t.Fatalf("the race detector found %d data races in rollcall's code on the reconnect path (%s):\n%s", len(ours), pattern, strings.Join(ours, "==================\n"))
	}
	t.Logf("race check of %s (built with -race, %v): no data race in rollcall's code; %d race reports within nacos-sdk-go's own code ignored",
		pattern, time.Since(start).Round(time.Millisecond), sdk)
}

// racesInOurCode reports whether one of the accesses of a race report is
// made by rollcall's code: the first frame of its stack outside the
// standard library (whose package paths have no dot in their first
// element) is in this module.
func racesInOurCode(rep string) bool {
	lines := strings.Split(rep, "\n")
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		if !strings.Contains(l, " at 0x") || !strings.Contains(l, " by ") {
			continue
		}
		// The access's frames: a function line, then its file line.
		for i++; i < len(lines) && strings.HasPrefix(lines[i], "  "); i += 2 {
			fn := strings.TrimSpace(lines[i])
			first, _, slash := strings.Cut(fn, "/")
			if !slash || !strings.Contains(first, ".") {
				continue // the standard library (runtime.mapaccess1, internal/..., net/http...)
			}
			if strings.HasPrefix(fn, "github.com/rollcall-go/rollcall/") {
				return true
			}
			break
		}
	}
	return false
}

func buildNoRaceBinary() {
	b := &noRaceBinary
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	if b.dir, b.err = os.MkdirTemp("", "rollcall-nacos-norace-"); b.err != nil {
		return
	}
	b.path = filepath.Join(b.dir, "nacos.test")
	cmd := exec.Command(goTool, "test", "-c", "-race=false", "-o", b.path, ".")
	cmd.Env = append(os.Environ(), origEnv...) // the caches of the go command, not the test's HOME
	if _, file, _, ok := runtime.Caller(0); ok {
		if st, err := os.Stat(filepath.Dir(file)); err == nil && st.IsDir() {
			cmd.Dir = filepath.Dir(file)
		}
	}
	b.out, b.err = cmd.CombinedOutput()
}

func removeNoRaceBinary() {
	if noRaceBinary.dir != "" {
		_ = os.RemoveAll(noRaceBinary.dir)
	}
}

// reconnectingProperties are the conformance properties whose faults make
// the SDK reconnect.
var reconnectingProperties = []string{
	"LeaseExpiresAfterCrash",
	"WatchKeepsLastListWhileServerPaused",
	"WatchKeepsLastListWhileServerStopped",
	"ReregistersAfterLeaseRevoked",
	"ReregistersAfterServerRestartWithWipedData",
	"WatchSurvivesOutageLongerThanTTL",
	"WatchStartedWhileServerDownIsStale",
	"ColdStartWhileServerDownServesTheSnapshot",
	"CallsFailFastWhileServerDown",
	"DeregisterDuringOutageCompletesWhenServerReturns",
	"CloseIsBoundedWhileServerPaused",
	"FreezeNeverShrinks",
	"NoGoroutineLeaksAfterFaults",
}

// TestConformanceWithoutRace runs, under -race, the conformance properties
// that TestConformance skips there, in a child binary built without -race.
func TestConformanceWithoutRace(t *testing.T) {
	if !raceChild() {
		t.Skip("not under -race: TestConformance runs every property itself")
	}
	runWithoutRace(t, "^TestConformance$/^("+strings.Join(reconnectingProperties, "|")+")$")
}

// The race check tells the SDK's own races from races in rollcall's code by
// the first frame outside the standard library of each access.
func TestRaceCheckTellsOurRacesFromTheSDKs(t *testing.T) {
	sdkOnly := `WARNING: DATA RACE
Write at 0x00c0003a8d20 by goroutine 88:
  github.com/nacos-group/nacos-sdk-go/v2/common/remote/rpc.(*RpcClient).reconnect()
      /go/pkg/mod/github.com/nacos-group/nacos-sdk-go/v2@v2.3.5/common/remote/rpc/rpc_client.go:449 +0x6a4

Previous read at 0x00c0003a8d20 by goroutine 87:
  github.com/nacos-group/nacos-sdk-go/v2/common/remote/rpc.(*RpcClient).notifyConnectionChange()
      /go/pkg/mod/github.com/nacos-group/nacos-sdk-go/v2@v2.3.5/common/remote/rpc/rpc_client.go:487 +0x84
  github.com/rollcall-go/rollcall/backends/nacos.(*watch).run()
      /work/backends/nacos/watch.go:10 +0x1
`
	ours := `WARNING: DATA RACE
Read at 0x00c0001b2f48 by goroutine 40:
  runtime.mapaccess1_faststr()
      /usr/local/go/src/internal/runtime/maps/runtime_faststr.go:101 +0x0
  github.com/rollcall-go/rollcall/backends/nacos.(*backend).onPush()
      /work/backends/nacos/watch.go:120 +0x1

Previous write at 0x00c0001b2f48 by goroutine 41:
  github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client.(*NamingClient).Subscribe()
      /go/pkg/mod/github.com/nacos-group/nacos-sdk-go/v2@v2.3.5/clients/naming_client/naming_client.go:300 +0x1
`
	if racesInOurCode(sdkOnly) {
		t.Error("a race between two accesses in the SDK's code was blamed on rollcall")
	}
	if !racesInOurCode(ours) {
		t.Error("a race with an access in rollcall's code (under a map access) was not found")
	}
}
