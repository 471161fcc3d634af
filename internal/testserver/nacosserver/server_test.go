package nacosserver

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	pb "github.com/nacos-group/nacos-sdk-go/v2/api/grpc"
	"github.com/nacos-group/nacos-sdk-go/v2/clients"
	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client"
	"github.com/nacos-group/nacos-sdk-go/v2/common/constant"
	"github.com/nacos-group/nacos-sdk-go/v2/common/remote/rpc/rpc_request"
	"github.com/nacos-group/nacos-sdk-go/v2/common/remote/rpc/rpc_response"
	"github.com/nacos-group/nacos-sdk-go/v2/model"
	"github.com/nacos-group/nacos-sdk-go/v2/vo"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/anypb"
)

const (
	clientTimeoutMs = 1000
	waitTimeout     = 20 * time.Second
)

// env is one test's server plus the SDK clients it creates.
type env struct {
	t   *testing.T
	srv *Server
	dir string
	n   int
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, srv: Start(t), dir: t.TempDir()}
	// Runs after every client's CloseClient and before the TempDir is removed:
	// the SDK writes its cache from its stream goroutine, let it finish.
	t.Cleanup(func() { waitSDKQuiet(t) })
	return e
}

// client is an SDK naming client configured as the brief says: cache not
// loaded at start, empty pushes applied, cache and logs in the test's dir.
func (e *env) client(namespace string) naming_client.INamingClient {
	e.t.Helper()
	e.n++
	dir := filepath.Join(e.dir, strconv.Itoa(e.n))
	cc := constant.ClientConfig{
		NamespaceId:          namespace,
		TimeoutMs:            clientTimeoutMs,
		NotLoadCacheAtStart:  true,
		UpdateCacheWhenEmpty: true,
		CacheDir:             filepath.Join(dir, "cache"),
		LogDir:               filepath.Join(dir, "log"),
		LogLevel:             "error",
	}
	cli, err := clients.NewNamingClient(vo.NacosClientParam{
		ClientConfig:  &cc,
		ServerConfigs: []constant.ServerConfig{{IpAddr: e.srv.Host(), Port: e.srv.Port()}},
	})
	if err != nil {
		e.t.Fatalf("NewNamingClient: %v", err)
	}
	e.t.Cleanup(cli.CloseClient)
	waitSDKEventsIdle(e.t)
	return cli
}

// waitSDKEventsIdle waits until every SDK connection-event goroutine
// (RpcClient.Start.func1) is parked in its select. NewNamingClient returns
// with the CONNECTED event still queued; if that goroutine runs after the
// proxy registered its listener, it replays (redo) the registrations it
// finds at that moment, a few milliseconds later, which can resurrect a
// registration the test already replaced. Waiting here makes tests
// deterministic; see the package report for the SDK race itself.
func waitSDKEventsIdle(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		busy := false
		for _, g := range strings.Split(string(buf[:n]), "\n\n") {
			if strings.Contains(g, "rpc.(*RpcClient).Start.func1(") {
				header, _, _ := strings.Cut(g, "\n")
				if !strings.Contains(header, "[select") {
					busy = true
				}
			}
		}
		if !busy {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("SDK event goroutines still busy after 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// sdkGoroutines are the SDK goroutines that stop once every client is
// closed; they may still be writing to a client's cache directory.
var sdkGoroutines = []string{
	"nacos-sdk-go/v2/common/remote/rpc.(*GrpcClient).bindBiRequestStream",
	"nacos-sdk-go/v2/common/remote/rpc.(*RpcClient).Start.func",
}

func waitSDKQuiet(t *testing.T) {
	deadline := time.Now().Add(15 * time.Second)
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		stacks := string(buf[:n])
		busy := slices.ContainsFunc(sdkGoroutines, func(f string) bool { return strings.Contains(stacks, f) })
		if !busy {
			return
		}
		if time.Now().After(deadline) {
			t.Logf("SDK goroutines still running after 15s")
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", waitTimeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func eph(ip string, port uint64, service string) vo.RegisterInstanceParam {
	return vo.RegisterInstanceParam{Ip: ip, Port: port, ServiceName: service, Weight: 1, Enable: true, Healthy: true, Ephemeral: true}
}

func mustRegister(t *testing.T, cli naming_client.INamingClient, p vo.RegisterInstanceParam) {
	t.Helper()
	ok, err := cli.RegisterInstance(p)
	if err != nil || !ok {
		t.Fatalf("RegisterInstance(%s %s:%d): %v %v", p.ServiceName, p.Ip, p.Port, ok, err)
	}
}

func mustDeregister(t *testing.T, cli naming_client.INamingClient, service, ip string, port uint64) {
	t.Helper()
	// Ephemeral must be true: with false the SDK goes to the HTTP API.
	ok, err := cli.DeregisterInstance(vo.DeregisterInstanceParam{ServiceName: service, Ip: ip, Port: port, Ephemeral: true})
	if err != nil || !ok {
		t.Fatalf("DeregisterInstance(%s %s:%d): %v %v", service, ip, port, ok, err)
	}
}

func addrs(insts []model.Instance) []string {
	out := make([]string, 0, len(insts))
	for _, in := range insts {
		out = append(out, in.Ip+":"+strconv.FormatUint(in.Port, 10))
	}
	sort.Strings(out)
	return out
}

func same(insts []model.Instance, want ...string) bool {
	sort.Strings(want)
	return slices.Equal(addrs(insts), want)
}

// recorder collects what a Subscribe callback receives.
type recorder struct {
	mu    sync.Mutex
	calls [][]model.Instance
}

func (r *recorder) callback(insts []model.Instance, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	// The SDK hands over its cached slice and later sorts it in place: copy.
	r.calls = append(r.calls, slices.Clone(insts))
}

func (r *recorder) last() (insts []model.Instance, n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.calls) == 0 {
		return nil, 0
	}
	return r.calls[len(r.calls)-1], len(r.calls)
}

func (r *recorder) history() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, c := range r.calls {
		out = append(out, fmt.Sprint(addrs(c)))
	}
	return out
}

func (r *recorder) waitLast(t *testing.T, want ...string) {
	t.Helper()
	waitFor(t, fmt.Sprintf("a callback with %v", want), func() bool {
		insts, n := r.last()
		return n > 0 && same(insts, want...)
	})
}

func TestRegisterThenSelectAllInstances(t *testing.T) {
	e := newEnv(t)
	w := e.client("")
	p := eph("10.0.0.1", 8080, "user.rpc")
	p.Weight = 2.5
	p.ClusterName = "c1"
	p.Metadata = map[string]string{"zone": "a", "version": "1"}
	mustRegister(t, w, p)

	got := e.srv.Instances("", "", "user.rpc")
	if len(got) != 1 {
		t.Fatalf("server holds %v", got)
	}
	want := model.Instance{
		InstanceId: "10.0.0.1#8080#c1#DEFAULT_GROUP@@user.rpc", Ip: "10.0.0.1", Port: 8080, Weight: 2.5,
		Healthy: true, Enable: true, Ephemeral: true, ClusterName: "c1", ServiceName: "DEFAULT_GROUP@@user.rpc",
		Metadata:                  map[string]string{"zone": "a", "version": "1"},
		InstanceHeartBeatInterval: 5000, InstanceHeartBeatTimeOut: 15000, IpDeleteTimeout: 30000,
	}
	if !reflect.DeepEqual(got[0], want) {
		t.Fatalf("server instance\n got %+v\nwant %+v", got[0], want)
	}

	for name, cli := range map[string]naming_client.INamingClient{"writer": w, "reader": e.client("")} {
		var insts []model.Instance
		waitFor(t, name+" sees the instance", func() bool {
			var err error
			insts, err = cli.SelectAllInstances(vo.SelectAllInstancesParam{ServiceName: "user.rpc"})
			return err == nil && len(insts) == 1
		})
		if !reflect.DeepEqual(insts[0], want) {
			t.Fatalf("%s sees\n got %+v\nwant %+v", name, insts[0], want)
		}
	}
	// Select* subscribes: the lookups left subscriptions on the server.
	if n := e.srv.Subscribers("", "", "user.rpc"); n != 2 {
		t.Fatalf("Subscribers = %d, want 2", n)
	}
}

func TestSubscribePushesRegisterAndDeregister(t *testing.T) {
	e := newEnv(t)
	e.srv.SetPushDelay(50 * time.Millisecond)
	r := e.client("")
	rec := &recorder{}
	param := &vo.SubscribeParam{ServiceName: "svc", SubscribeCallback: rec.callback}
	if err := r.Subscribe(param); err != nil {
		t.Fatal(err)
	}
	rec.waitLast(t) // the subscription's (empty) answer is delivered too

	w1, w2 := e.client(""), e.client("")
	mustRegister(t, w1, eph("10.0.0.1", 80, "svc"))
	rec.waitLast(t, "10.0.0.1:80")
	mustRegister(t, w2, eph("10.0.0.2", 80, "svc"))
	rec.waitLast(t, "10.0.0.1:80", "10.0.0.2:80")
	mustDeregister(t, w1, "svc", "10.0.0.1", 80)
	rec.waitLast(t, "10.0.0.2:80")
	mustDeregister(t, w2, "svc", "10.0.0.2", 80)
	rec.waitLast(t) // the empty push after the last instance went
	t.Logf("callbacks: %v", rec.history())

	if err := r.Unsubscribe(param); err != nil { // the same *SubscribeParam: see TestSDKUnsubscribeQuirks
		t.Fatal(err)
	}
	waitFor(t, "no subscriber", func() bool { return e.srv.Subscribers("", "", "svc") == 0 })
}

func TestCloseClientRemovesItsEphemeralInstances(t *testing.T) {
	e := newEnv(t)
	e.srv.SetPushDelay(0)
	r := e.client("")
	rec := &recorder{}
	if err := r.Subscribe(&vo.SubscribeParam{ServiceName: "svc", SubscribeCallback: rec.callback}); err != nil {
		t.Fatal(err)
	}
	w := e.client("")
	mustRegister(t, w, eph("10.0.0.1", 80, "svc"))
	keep := e.client("")
	mustRegister(t, keep, eph("10.0.0.9", 80, "svc"))
	rec.waitLast(t, "10.0.0.1:80", "10.0.0.9:80")
	if n := e.srv.ConnectionCount(); n != 3 {
		t.Fatalf("ConnectionCount = %d, want 3", n)
	}

	w.CloseClient()
	rec.waitLast(t, "10.0.0.9:80")
	waitFor(t, "the closed client's connection to go", func() bool { return e.srv.ConnectionCount() == 2 })
	if got := e.srv.Instances("", "", "svc"); !same(got, "10.0.0.9:80") {
		t.Fatalf("server holds %v", addrs(got))
	}
}

func TestOnePublicationPerServicePerConnection(t *testing.T) {
	e := newEnv(t)
	e.srv.SetPushDelay(0)
	w := e.client("")
	// Nacos keeps one publication per service per connection: a second
	// RegisterInstance replaces the first.
	mustRegister(t, w, eph("10.0.0.1", 80, "svc"))
	mustRegister(t, w, eph("10.0.0.2", 80, "svc"))
	if got := e.srv.Instances("", "", "svc"); !same(got, "10.0.0.2:80") {
		t.Fatalf("after two registrations the server holds %v", addrs(got))
	}
	// Several instances need BatchRegisterInstance (which also replaces).
	ok, err := w.BatchRegisterInstance(vo.BatchRegisterInstanceParam{ServiceName: "svc", Instances: []vo.RegisterInstanceParam{
		eph("10.0.0.3", 80, "svc"), eph("10.0.0.4", 80, "svc"),
	}})
	if err != nil || !ok {
		t.Fatalf("BatchRegisterInstance: %v %v", ok, err)
	}
	if got := e.srv.Instances("", "", "svc"); !same(got, "10.0.0.3:80", "10.0.0.4:80") {
		t.Fatalf("after the batch the server holds %v", addrs(got))
	}
	// Deregistering removes the whole publication, whatever address it names.
	mustDeregister(t, w, "svc", "192.0.2.1", 1)
	if got := e.srv.Instances("", "", "svc"); len(got) != 0 {
		t.Fatalf("after deregistering the server holds %v", addrs(got))
	}
	// Another connection cannot deregister what this one published.
	mustRegister(t, w, eph("10.0.0.5", 80, "svc"))
	mustDeregister(t, e.client(""), "svc", "10.0.0.5", 80)
	if got := e.srv.Instances("", "", "svc"); !same(got, "10.0.0.5:80") {
		t.Fatalf("a foreign deregistration removed it: %v", addrs(got))
	}
}

func TestPauseMakesCallsFailAndResumeRecovers(t *testing.T) {
	if runWithoutRace(t) {
		return
	}
	e := newEnv(t)
	e.srv.SetPushDelay(0)
	cli := e.client("")
	mustRegister(t, cli, eph("10.0.0.1", 80, "a"))

	e.srv.Pause()
	start := time.Now()
	ok, err := cli.RegisterInstance(eph("10.0.0.2", 80, "b"))
	took := time.Since(start)
	if err == nil || ok {
		t.Fatalf("RegisterInstance on a paused server: %v %v", ok, err)
	}
	t.Logf("RegisterInstance failed after %v: %v", took, err)
	if took < clientTimeoutMs*time.Millisecond/2 || took > 10*time.Second {
		t.Fatalf("RegisterInstance failed after %v, want about the client timeout (%d ms)", took, clientTimeoutMs)
	}
	if got := e.srv.Instances("", "", "b"); len(got) != 0 {
		t.Fatalf("a paused server registered %v", addrs(got))
	}

	e.srv.Resume()
	// The SDK reconnects (it gave up on the frozen connection), and replays
	// what it had registered: "a", and also "b", whose RegisterInstance
	// failed (the SDK caches a registration for redo before sending it).
	waitFor(t, "a and b registered after Resume", func() bool {
		return same(e.srv.Instances("", "", "a"), "10.0.0.1:80") && same(e.srv.Instances("", "", "b"), "10.0.0.2:80")
	})
	waitFor(t, "one connection", func() bool { return e.srv.ConnectionCount() == 1 })
	mustRegister(t, cli, eph("10.0.0.3", 80, "c"))
}

func TestStopStartReconnectsAndReplays(t *testing.T) {
	if runWithoutRace(t) {
		return
	}
	e := newEnv(t)
	e.srv.SetPushDelay(0)
	r := e.client("")
	rec := &recorder{}
	if err := r.Subscribe(&vo.SubscribeParam{ServiceName: "svc", SubscribeCallback: rec.callback}); err != nil {
		t.Fatal(err)
	}
	w := e.client("")
	mustRegister(t, w, eph("10.0.0.1", 80, "svc"))
	rec.waitLast(t, "10.0.0.1:80")
	before := e.srv.ConnectionIDs()

	e.srv.Stop()
	outage := time.NewTimer(2 * time.Second) // the SDK keeps retrying with a growing pause
	defer outage.Stop()
	if n := e.srv.ConnectionCount(); n != 0 {
		t.Fatalf("ConnectionCount after Stop = %d", n)
	}
	if got := e.srv.Instances("", "", "svc"); len(got) != 0 {
		t.Fatalf("ephemeral instances survived Stop: %v", addrs(got))
	}
	// While disconnected, requests fail fast ("client not connected") but
	// are remembered and replayed on reconnect.
	if ok, err := w.RegisterInstance(eph("10.0.0.1", 81, "other")); err == nil || ok {
		t.Fatalf("RegisterInstance on a stopped server: %v %v", ok, err)
	}
	<-outage.C
	e.srv.Start()

	waitFor(t, "the writer re-registers and the reader re-subscribes", func() bool {
		return same(e.srv.Instances("", "", "svc"), "10.0.0.1:80") && e.srv.Subscribers("", "", "svc") == 1 &&
			same(e.srv.Instances("", "", "other"), "10.0.0.1:81")
	})
	if after := e.srv.ConnectionIDs(); len(after) != 2 || slices.Equal(after, before) {
		t.Fatalf("connections before %v, after %v", before, after)
	}
	// What the reader's SDK holds once it has applied everything: its redo
	// (the re-subscribe's answer, applied on the connection-event goroutine)
	// and every push (applied on the stream goroutine, acknowledged after).
	//
	// Whether a callback fires after the restart is not something to wait
	// for: nacos-sdk-go v2.3.5 fires one only when a list differs from its
	// cache, which still holds the list from before the outage; so with the
	// writer re-registered before the re-subscribe there is none, with the
	// re-subscribe first there are two ([] then the list), and as those two
	// run on different goroutines, each calling back after its cache store
	// and a disk write, they can arrive in either order.
	waitSDKEventsIdle(t)
	waitFor(t, "every push of svc acknowledged", func() bool { return e.srv.PendingPushes("", "", "svc") == 0 })
	cached, err := r.GetService(vo.GetServiceParam{ServiceName: "svc"})
	if err != nil || !same(cached.Hosts, "10.0.0.1:80") {
		t.Fatalf("the reader's SDK cache holds %v (%v) after the restart, want [10.0.0.1:80]; callbacks %v",
			addrs(cached.Hosts), err, rec.history())
	}
	// The next change reaches the reader's callback: it is the only source
	// of news left, and its list differs from anything cached.
	mustRegister(t, e.client(""), eph("10.0.0.2", 80, "svc"))
	rec.waitLast(t, "10.0.0.1:80", "10.0.0.2:80")
	t.Logf("callbacks across the restart: %v", rec.history())
}

func TestDropConnectionsReconnects(t *testing.T) {
	if runWithoutRace(t) {
		return
	}
	e := newEnv(t)
	e.srv.SetPushDelay(0)
	w := e.client("")
	mustRegister(t, w, eph("10.0.0.1", 80, "svc"))
	before := e.srv.ConnectionIDs()
	if n := e.srv.DropConnections(); n < 1 {
		t.Fatalf("DropConnections = %d", n)
	}
	waitFor(t, "the SDK to reconnect and re-register", func() bool {
		ids := e.srv.ConnectionIDs()
		return len(ids) == 1 && ids[0] != before[0] && same(e.srv.Instances("", "", "svc"), "10.0.0.1:80")
	})

	// DropConnection cuts one connection, like a crashed client process.
	id := e.srv.ConnectionIDs()[0]
	if !e.srv.DropConnection(id) {
		t.Fatal("DropConnection found nothing")
	}
	if slices.Contains(e.srv.ConnectionIDs(), id) {
		t.Fatal("the dropped connection is still registered")
	}
	waitFor(t, "the SDK to come back", func() bool { return len(e.srv.Instances("", "", "svc")) == 1 })
}

func TestRestartKeepsInjectedUnlessWiped(t *testing.T) {
	e := newEnv(t)
	e.srv.Inject("", "", "svc", model.Instance{Ip: "10.0.0.7", Port: 7, Enable: true, Healthy: true, Weight: 1})
	e.srv.Restart(false)
	if got := e.srv.Instances("", "", "svc"); !same(got, "10.0.0.7:7") {
		t.Fatalf("after Restart(false): %v", addrs(got))
	}
	e.srv.Restart(true)
	if got := e.srv.Instances("", "", "svc"); len(got) != 0 {
		t.Fatalf("after Restart(true): %v", addrs(got))
	}
	// The server works after restarts.
	mustRegister(t, e.client(""), eph("10.0.0.1", 80, "svc"))
}

func TestInjectedInstancesReachSubscribers(t *testing.T) {
	e := newEnv(t)
	e.srv.SetPushDelay(0)
	r := e.client("")
	rec := &recorder{}
	if err := r.Subscribe(&vo.SubscribeParam{ServiceName: "svc", SubscribeCallback: rec.callback}); err != nil {
		t.Fatal(err)
	}
	rec.waitLast(t)
	// Malformed, but enabled: delivered as is.
	e.srv.Inject("", "", "svc", model.Instance{Ip: "", Port: 0, Enable: true, Weight: -3})
	rec.waitLast(t, ":0")
	// Disabled instances are not pushed (Nacos pushes enabled ones only).
	e.srv.Inject("", "", "svc", model.Instance{Ip: "10.0.0.8", Port: 8})
	e.srv.Inject("", "", "svc", model.Instance{Ip: "10.0.0.9", Port: 9, Enable: true})
	rec.waitLast(t, ":0", "10.0.0.9:9")
	if got := e.srv.Instances("", "", "svc"); len(got) != 3 {
		t.Fatalf("server holds %v", addrs(got))
	}
	if n := e.srv.RemoveInjected("", "", "svc", "", 0); n != 1 {
		t.Fatalf("RemoveInjected = %d", n)
	}
	rec.waitLast(t, "10.0.0.9:9")
}

func TestNamespacesGroupsClustersStayApart(t *testing.T) {
	e := newEnv(t)
	e.srv.SetPushDelay(0)
	a, b := e.client("ns-a"), e.client("ns-b")
	g1 := eph("10.0.1.1", 80, "svc")
	g1.GroupName = "G1"
	g1.ClusterName = "east"
	g1.Weight = 3
	g1.Metadata = map[string]string{"k": "g1"}
	mustRegister(t, a, g1)
	g2 := eph("10.0.2.1", 80, "svc")
	g2.GroupName = "G2"
	g2.ClusterName = "west"
	mustRegister(t, e.client("ns-a"), g2)
	mustRegister(t, b, eph("10.0.3.1", 80, "svc"))
	mustRegister(t, e.client("ns-a"), eph("10.0.4.1", 80, "other"))

	check := func(ns, group, service string, want ...string) {
		t.Helper()
		if got := e.srv.Instances(ns, group, service); !same(got, want...) {
			t.Fatalf("%s/%s/%s holds %v, want %v", ns, group, service, addrs(got), want)
		}
	}
	check("ns-a", "G1", "svc", "10.0.1.1:80")
	check("ns-a", "G2", "svc", "10.0.2.1:80")
	check("ns-a", "DEFAULT_GROUP", "svc")
	check("ns-b", "DEFAULT_GROUP", "svc", "10.0.3.1:80")
	check("public", "DEFAULT_GROUP", "svc")
	if in := e.srv.Instances("ns-a", "G1", "svc")[0]; in.Weight != 3 || in.Metadata["k"] != "g1" || in.ClusterName != "east" {
		t.Fatalf("instance lost its fields: %+v", in)
	}

	reader := e.client("ns-a")
	var insts []model.Instance
	waitFor(t, "the reader sees G1", func() bool {
		var err error
		insts, err = reader.SelectAllInstances(vo.SelectAllInstancesParam{ServiceName: "svc", GroupName: "G1"})
		return err == nil && len(insts) == 1
	})
	if insts[0].Weight != 3 || insts[0].Metadata["k"] != "g1" {
		t.Fatalf("reader sees %+v", insts[0])
	}
	// Cluster filtering is done by the SDK on the whole service.
	mustRegister(t, e.client("ns-a"), func() vo.RegisterInstanceParam {
		p := eph("10.0.1.2", 80, "svc")
		p.GroupName = "G1"
		p.ClusterName = "north"
		return p
	}())
	waitFor(t, "the reader sees both clusters", func() bool {
		insts, err := reader.SelectAllInstances(vo.SelectAllInstancesParam{ServiceName: "svc", GroupName: "G1"})
		return err == nil && len(insts) == 2
	})
	east, err := reader.SelectAllInstances(vo.SelectAllInstancesParam{ServiceName: "svc", GroupName: "G1", Clusters: []string{"east"}})
	if err != nil || !same(east, "10.0.1.1:80") {
		t.Fatalf("cluster east: %v %v", addrs(east), err)
	}

	list, err := reader.GetAllServicesInfo(vo.GetAllServiceInfoParam{NameSpace: "ns-a", GroupName: "DEFAULT_GROUP", PageNo: 1, PageSize: 10})
	if err != nil || list.Count != 1 || !slices.Equal(list.Doms, []string{"other"}) {
		t.Fatalf("services of ns-a/DEFAULT_GROUP: %+v %v", list, err)
	}
	list, err = reader.GetAllServicesInfo(vo.GetAllServiceInfoParam{NameSpace: "ns-a", GroupName: "G2", PageNo: 1, PageSize: 10})
	if err != nil || list.Count != 1 || !slices.Equal(list.Doms, []string{"svc"}) {
		t.Fatalf("services of ns-a/G2: %+v %v", list, err)
	}
	// Without PageNo/PageSize the SDK asks for page 0 of size 0: no names.
	list, err = reader.GetAllServicesInfo(vo.GetAllServiceInfoParam{NameSpace: "ns-a"})
	if err != nil || list.Count != 1 || len(list.Doms) != 0 {
		t.Fatalf("services of ns-a without paging: %+v %v", list, err)
	}
}

func TestInvalidRegistrationIsRejected(t *testing.T) {
	if runWithoutRace(t) {
		return
	}
	e := newEnv(t)
	cli := e.client("")
	p := eph("10.0.0.1", 80, "svc")
	p.ClusterName = "bad_cluster"
	ok, err := cli.RegisterInstance(p)
	if err == nil || ok || !strings.Contains(err.Error(), "clusterName") {
		t.Fatalf("RegisterInstance with a bad cluster: %v %v", ok, err)
	}
	if got := e.srv.Instances("", "", "svc"); len(got) != 0 {
		t.Fatalf("server holds %v", addrs(got))
	}
	// Malformed addresses are accepted, as by Nacos.
	waitFor(t, "a registration with an empty IP to succeed", func() bool {
		ok, err := cli.RegisterInstance(eph("", 0, "svc2"))
		return err == nil && ok
	})
}

func TestConnectResetAndClientDetection(t *testing.T) {
	if runWithoutRace(t) {
		return
	}
	e := newEnv(t)
	e.srv.SetPushDelay(0)
	w := e.client("")
	mustRegister(t, w, eph("10.0.0.1", 80, "svc"))
	if n := e.srv.DetectClients(3 * time.Second); n != 1 {
		t.Fatalf("DetectClients = %d, want 1", n)
	}
	before := e.srv.ConnectionIDs()
	// Without a server address the SDK health-checks and keeps its connection.
	if n := e.srv.SendConnectReset("", ""); n != 1 {
		t.Fatalf("SendConnectReset acknowledged by %d", n)
	}
	// Naming a server of its list makes it reconnect.
	if n := e.srv.SendConnectReset(e.srv.Host(), strconv.FormatUint(e.srv.Port(), 10)); n != 1 {
		t.Fatalf("SendConnectReset acknowledged by %d", n)
	}
	waitFor(t, "a new connection with the instance re-registered", func() bool {
		ids := e.srv.ConnectionIDs()
		return len(ids) == 1 && ids[0] != before[0] && len(e.srv.Instances("", "", "svc")) == 1
	})
}

// TestPersistentInstancesGoToHTTP shows where Ephemeral=false leads: the
// SDK sends persistent registrations, and every deregistration without
// Ephemeral=true, to the HTTP API, which this server does not implement.
func TestPersistentInstancesGoToHTTP(t *testing.T) {
	e := newEnv(t)
	cli := e.client("")
	p := eph("10.0.0.1", 80, "svc")
	p.Ephemeral = false
	if ok, err := cli.RegisterInstance(p); err == nil || ok || !strings.Contains(err.Error(), "501") {
		t.Fatalf("persistent RegisterInstance: %v %v", ok, err)
	}
	mustRegister(t, cli, eph("10.0.0.1", 80, "svc"))
	ok, err := cli.DeregisterInstance(vo.DeregisterInstanceParam{ServiceName: "svc", Ip: "10.0.0.1", Port: 80})
	if err == nil || ok {
		t.Fatalf("DeregisterInstance without Ephemeral: %v %v", ok, err)
	}
	if got := e.srv.Instances("", "", "svc"); len(got) != 1 {
		t.Fatalf("server holds %v", addrs(got))
	}
}

// TestSDKUnsubscribeQuirks pins down how the SDK's Unsubscribe finds the
// callback to remove: by the address of the SubscribeParam's callback field,
// and with the group of that struct (Subscribe fills in DEFAULT_GROUP in the
// caller's struct, Unsubscribe does not).
func TestSDKUnsubscribeQuirks(t *testing.T) {
	if runWithoutRace(t) {
		return
	}
	e := newEnv(t)
	cli := e.client("")
	rec := &recorder{}
	param := &vo.SubscribeParam{ServiceName: "svc", SubscribeCallback: rec.callback}
	if err := cli.Subscribe(param); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a subscriber", func() bool { return e.srv.Subscribers("", "", "svc") == 1 })
	// A different struct with the same values: the callback is not found, the
	// SDK believes nobody listens any more, and sends an unsubscription for
	// group "" which Nacos rejects ("groupName is blank").
	err := cli.Unsubscribe(&vo.SubscribeParam{ServiceName: "svc", SubscribeCallback: rec.callback})
	t.Logf("Unsubscribe with a copy of the param: %v", err)
	if err == nil {
		t.Fatal("Unsubscribe with a copy succeeded")
	}
	if n := e.srv.Subscribers("", "", "svc"); n != 1 {
		t.Fatalf("Subscribers = %d", n)
	}
	if err := cli.Unsubscribe(param); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "no subscriber", func() bool { return e.srv.Subscribers("", "", "svc") == 0 })
}

// rawConn speaks the protocol directly through the SDK's stubs.
type rawConn struct {
	t      *testing.T
	cc     *grpc.ClientConn
	req    pb.RequestClient
	stream pb.BiRequestStream_RequestBiStreamClient
	id     string
	pushes chan *pb.Payload

	cancelStream context.CancelFunc
}

func dialRaw(t *testing.T, s *Server, setup bool) *rawConn {
	t.Helper()
	cc, err := grpc.NewClient(s.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	rc := &rawConn{t: t, cc: cc, req: pb.NewRequestClient(cc), pushes: make(chan *pb.Payload, 100)}
	var done sync.WaitGroup
	t.Cleanup(func() {
		_ = cc.Close()
		done.Wait()
	})
	typ, body := rc.call("ServerCheckRequest", rpc_request.NewServerCheckRequest())
	var sc rpc_response.ServerCheckResponse
	if err := json.Unmarshal(body, &sc); err != nil || typ != "ServerCheckResponse" || !sc.Success {
		t.Fatalf("server check: %s %s %v", typ, body, err)
	}
	rc.id = sc.ConnectionId
	if !setup {
		return rc
	}
	ctx, cancel := context.WithCancel(context.Background())
	rc.cancelStream = cancel
	t.Cleanup(cancel)
	rc.stream, err = pb.NewBiRequestStreamClient(cc).RequestBiStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	done.Add(1)
	go func() {
		defer done.Done()
		for {
			p, err := rc.stream.Recv()
			if err != nil {
				close(rc.pushes)
				return
			}
			rc.pushes <- p
		}
	}()
	csr := rpc_request.NewConnectionSetupRequest()
	csr.ClientVersion = "raw-test"
	csr.Labels = map[string]string{"source": "sdk", "module": "naming"}
	rc.send(payload(t, csr.GetRequestType(), csr))
	waitFor(t, "the connection to be registered", func() bool { return slices.Contains(s.ConnectionIDs(), rc.id) })
	return rc
}

func payload(t *testing.T, typ string, v any) *pb.Payload {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return &pb.Payload{Metadata: &pb.Metadata{Type: typ, ClientIp: "127.0.0.1"}, Body: &anypb.Any{Value: b}}
}

func (rc *rawConn) send(p *pb.Payload) {
	if err := rc.stream.Send(p); err != nil {
		rc.t.Fatalf("stream send: %v", err)
	}
}

func (rc *rawConn) call(typ string, v any) (string, []byte) {
	rc.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := rc.req.Request(ctx, payload(rc.t, typ, v))
	if err != nil {
		rc.t.Fatalf("%s: %v", typ, err)
	}
	return resp.GetMetadata().GetType(), resp.GetBody().GetValue()
}

func (rc *rawConn) errorCode(typ string, v any) (int, string) {
	rc.t.Helper()
	rt, body := rc.call(typ, v)
	if rt != "ErrorResponse" {
		rc.t.Fatalf("%s answered %s %s, want an ErrorResponse", typ, rt, body)
	}
	var er rpc_response.Response
	if err := json.Unmarshal(body, &er); err != nil {
		rc.t.Fatal(err)
	}
	if er.Success || er.ResultCode != 500 {
		rc.t.Fatalf("error response %s", body)
	}
	return er.ErrorCode, er.Message
}

// nextPush returns the next NotifySubscriberRequest and acknowledges it.
func (rc *rawConn) nextPush() model.Service {
	rc.t.Helper()
	select {
	case p, ok := <-rc.pushes:
		if !ok {
			rc.t.Fatal("stream closed")
		}
		if typ := p.GetMetadata().GetType(); typ != "NotifySubscriberRequest" {
			rc.t.Fatalf("got %s on the stream", typ)
		}
		var req rpc_request.NotifySubscriberRequest
		if err := json.Unmarshal(p.GetBody().GetValue(), &req); err != nil {
			rc.t.Fatal(err)
		}
		ack := &rpc_response.NotifySubscriberResponse{Response: &rpc_response.Response{ResultCode: 200, Success: true, RequestId: req.RequestId}}
		rc.send(payload(rc.t, ack.GetResponseType(), ack))
		return req.ServiceInfo
	case <-time.After(waitTimeout):
		rc.t.Fatal("no push")
	}
	return model.Service{}
}

func TestProtocolDirectly(t *testing.T) {
	e := newEnv(t)
	s := e.srv
	s.mu.Lock()
	s.ackWait = time.Second // instead of Nacos' 5 s, to test the retry quickly
	s.mu.Unlock()

	// Before ConnectionSetupRequest: server checks work, other requests are
	// refused as unregistered (which makes the SDK reconnect).
	bare := dialRaw(t, s, false)
	if parts := strings.Split(bare.id, "_"); len(parts) != 3 || parts[1] != "127.0.0.1" {
		t.Fatalf("connection id %q", bare.id)
	}
	if code, _ := bare.errorCode("HealthCheckRequest", rpc_request.NewHealthCheckRequest()); code != 301 {
		t.Fatalf("health check before setup: error %d", code)
	}
	if code, msg := bare.errorCode("ConfigQueryRequest", map[string]string{}); code != 302 {
		t.Fatalf("unknown request: %d %s", code, msg)
	}

	c := dialRaw(t, s, true)
	if typ, _ := c.call("HealthCheckRequest", rpc_request.NewHealthCheckRequest()); typ != "HealthCheckResponse" {
		t.Fatalf("health check answered %s", typ)
	}
	sub := rpc_request.NewSubscribeServiceRequest("public", "svc", "DEFAULT_GROUP", "", true)
	typ, body := c.call(sub.GetRequestType(), sub)
	var sr rpc_response.SubscribeServiceResponse
	if err := json.Unmarshal(body, &sr); err != nil || typ != "SubscribeServiceResponse" || !sr.Success ||
		sr.ServiceInfo.Name != "svc" || sr.ServiceInfo.GroupName != "DEFAULT_GROUP" || len(sr.ServiceInfo.Hosts) != 0 {
		t.Fatalf("subscribe: %s %s %v", typ, body, err)
	}
	first := c.nextPush() // a first subscription is pushed to the subscriber
	if len(first.Hosts) != 0 {
		t.Fatalf("first push %+v", first)
	}

	// Changes within the push delay are merged into one push.
	for _, ip := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"} {
		reg := rpc_request.NewInstanceRequest("public", "svc", "DEFAULT_GROUP", "registerInstance",
			model.Instance{Ip: ip, Port: 80, Weight: 1, Enable: true, Healthy: true, Ephemeral: true})
		if typ, body := c.call(reg.GetRequestType(), reg); typ != "InstanceResponse" {
			t.Fatalf("register: %s %s", typ, body)
		}
	}
	merged := c.nextPush()
	if !same(merged.Hosts, "10.0.0.3:80") || merged.LastRefTime <= first.LastRefTime {
		t.Fatalf("merged push %+v after %+v", merged, first)
	}

	q := rpc_request.NewServiceQueryRequest("public", "svc", "DEFAULT_GROUP", "", false, 0)
	typ, body = c.call(q.GetRequestType(), q)
	var qr rpc_response.QueryServiceResponse
	if err := json.Unmarshal(body, &qr); err != nil || typ != "QueryServiceResponse" || !same(qr.ServiceInfo.Hosts, "10.0.0.3:80") {
		t.Fatalf("query: %s %s %v", typ, body, err)
	}

	bad := rpc_request.NewInstanceRequest("public", "svc", "DEFAULT_GROUP", "registerInstance", model.Instance{Ip: "10.0.0.4", Port: 80, ClusterName: "a.b"})
	if code, msg := c.errorCode(bad.GetRequestType(), bad); code != 400 || !strings.Contains(msg, "clusterName") {
		t.Fatalf("bad cluster: %d %s", code, msg)
	}
	blank := rpc_request.NewInstanceRequest("public", "svc", "", "registerInstance", model.Instance{Ip: "10.0.0.4", Port: 80})
	if code, msg := c.errorCode(blank.GetRequestType(), blank); code != 500 || !strings.Contains(msg, "groupName") {
		t.Fatalf("blank group: %d %s", code, msg)
	}
	odd := rpc_request.NewInstanceRequest("public", "svc", "DEFAULT_GROUP", "updateInstance", model.Instance{Ip: "10.0.0.4", Port: 80})
	if code, _ := c.errorCode(odd.GetRequestType(), odd); code != 400 {
		t.Fatalf("unknown instance request type: %d", code)
	}
	if code, _ := c.errorCode("InstanceRequest", "not an object"); code != 502 {
		t.Fatalf("unparsable body: %d", code)
	}

	list := rpc_request.NewServiceListRequest("public", "", "DEFAULT_GROUP", 1, 10, "")
	typ, body = c.call(list.GetRequestType(), list)
	var lr rpc_response.ServiceListResponse
	if err := json.Unmarshal(body, &lr); err != nil || lr.Count != 1 || !slices.Equal(lr.ServiceNames, []string{"svc"}) {
		t.Fatalf("service list: %s %s %v", typ, body, err)
	}

	// An unacknowledged push is retried.
	other := dialRaw(t, s, true)
	reg := rpc_request.NewInstanceRequest("public", "svc", "DEFAULT_GROUP", "registerInstance", model.Instance{Ip: "10.0.0.9", Port: 80, Enable: true})
	other.call(reg.GetRequestType(), reg)
	p1 := <-c.pushes // not acknowledged
	var n1 rpc_request.NotifySubscriberRequest
	if err := json.Unmarshal(p1.GetBody().GetValue(), &n1); err != nil || !same(n1.ServiceInfo.Hosts, "10.0.0.3:80", "10.0.0.9:80") {
		t.Fatalf("push %s %v", p1.GetBody().GetValue(), err)
	}
	retried := c.nextPush()
	if !same(retried.Hosts, "10.0.0.3:80", "10.0.0.9:80") || retried.LastRefTime <= n1.ServiceInfo.LastRefTime {
		t.Fatalf("retried push %+v", retried)
	}

	// The stream ending unregisters the connection and its instances.
	other.cc.Close()
	left := c.nextPush()
	if !same(left.Hosts, "10.0.0.3:80") {
		t.Fatalf("push after the other connection left: %+v", left)
	}
	if n := s.ConnectionCount(); n != 1 {
		t.Fatalf("ConnectionCount = %d", n)
	}
}

func TestPauseFreezesStreams(t *testing.T) {
	e := newEnv(t)
	s := e.srv
	s.SetPushDelay(0)
	c := dialRaw(t, s, true)
	sub := rpc_request.NewSubscribeServiceRequest("public", "svc", "DEFAULT_GROUP", "", true)
	c.call(sub.GetRequestType(), sub)
	c.nextPush()

	s.Pause()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_, err := c.req.Request(ctx, payload(t, "HealthCheckRequest", rpc_request.NewHealthCheckRequest()))
	cancel()
	if err == nil {
		t.Fatal("a paused server answered")
	}
	s.Inject("", "", "svc", model.Instance{Ip: "10.0.0.1", Port: 1, Enable: true})
	select {
	case p := <-c.pushes:
		t.Fatalf("a paused server pushed %s", p.GetBody().GetValue())
	case <-time.After(300 * time.Millisecond): // a frozen server must stay silent for a while
	}
	s.Resume()
	if got := c.nextPush(); !same(got.Hosts, "10.0.0.1:1") {
		t.Fatalf("push after Resume: %+v", got)
	}
}

// TestRawConnectionsAcrossStopStartAndDrop exercises, under the race detector
// too, the server paths that the SDK tests above drive in a child process.
func TestRawConnectionsAcrossStopStartAndDrop(t *testing.T) {
	e := newEnv(t)
	s := e.srv
	s.SetPushDelay(0)
	register := func(rc *rawConn, ip string) {
		t.Helper()
		reg := rpc_request.NewInstanceRequest("public", "svc", "DEFAULT_GROUP", "registerInstance",
			model.Instance{Ip: ip, Port: 80, Weight: 1, Enable: true, Healthy: true, Ephemeral: true})
		if typ, body := rc.call(reg.GetRequestType(), reg); typ != "InstanceResponse" {
			t.Fatalf("register: %s %s", typ, body)
		}
	}
	streamEnds := func(rc *rawConn) {
		t.Helper()
		for {
			select {
			case _, ok := <-rc.pushes:
				if !ok {
					return
				}
			case <-time.After(waitTimeout):
				t.Fatal("the stream did not end")
			}
		}
	}
	s.Inject("", "", "svc", model.Instance{Ip: "10.0.0.100", Port: 1, Enable: true})

	a := dialRaw(t, s, true)
	register(a, "10.0.0.1")
	s.Stop()
	streamEnds(a)
	if got := s.Instances("", "", "svc"); !same(got, "10.0.0.100:1") {
		t.Fatalf("after Stop: %v", addrs(got))
	}
	s.Start()
	b := dialRaw(t, s, true)
	register(b, "10.0.0.2")
	c := dialRaw(t, s, true)
	sub := rpc_request.NewSubscribeServiceRequest("public", "svc", "DEFAULT_GROUP", "", true)
	c.call(sub.GetRequestType(), sub)
	if got := c.nextPush(); !same(got.Hosts, "10.0.0.100:1", "10.0.0.2:80") {
		t.Fatalf("push after restart: %+v", got)
	}

	if n := s.DropConnections(); n != 2 {
		t.Fatalf("DropConnections = %d", n)
	}
	streamEnds(b)
	streamEnds(c)
	if n := s.ConnectionCount(); n != 0 {
		t.Fatalf("ConnectionCount = %d", n)
	}
	if got := s.Instances("", "", "svc"); !same(got, "10.0.0.100:1") {
		t.Fatalf("after DropConnections: %v", addrs(got))
	}
	// A request on a transport whose stream ended is refused as unregistered.
	d := dialRaw(t, s, true)
	d.cancelStream()
	streamEnds(d)
	waitFor(t, "the connection to be unregistered", func() bool { return s.ConnectionCount() == 0 })
	if code, _ := d.errorCode("HealthCheckRequest", rpc_request.NewHealthCheckRequest()); code != 301 {
		t.Fatalf("health check after the stream ended: error %d", code)
	}
	d = dialRaw(t, s, true)
	s.Pause()
	s.Stop() // stopping a paused server must not hang
	streamEnds(d)
	s.Start()
	register(dialRaw(t, s, true), "10.0.0.3")
}
