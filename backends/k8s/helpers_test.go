package k8s

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilnet "k8s.io/apimachinery/pkg/util/net"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/internal/testserver/provider"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

func TestMain(m *testing.M) {
	// As SERVERS.md advises for clients of a paused API server: client-go's
	// HTTP/2 health check then ends a stalled connection in about 8s instead
	// of 45s. The backend does not depend on it (it checks /readyz itself);
	// the raw client-go watch of the benchmarks does.
	os.Setenv("HTTP2_READ_IDLE_TIMEOUT_SECONDS", "5")
	os.Setenv("HTTP2_PING_TIMEOUT_SECONDS", "3")
	goleak.VerifyTestMain(m)
}

// testLogger writes to stderr at the level in ROLLCALL_TEST_LOG (debug,
// info, warn, error); nothing when unset.
func testLogger() *slog.Logger {
	var lvl slog.Level
	switch strings.ToLower(os.Getenv("ROLLCALL_TEST_LOG")) {
	case "debug":
		lvl = slog.LevelDebug
	case "info":
		lvl = slog.LevelInfo
	case "warn":
		lvl = slog.LevelWarn
	case "error":
		lvl = slog.LevelError
	default:
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

// kubeEnv is a kube-apiserver for a test, with an admin client.
type kubeEnv struct {
	srv   provider.Kube // child processes, or containers (ROLLCALL_TEST_SERVERS=containers)
	admin kubernetes.Interface
}

func startKube(t testing.TB, users ...string) *kubeEnv {
	t.Helper()
	srv := provider.StartKube(t, &testserver.KubeOptions{Users: users})
	e := &kubeEnv{srv: srv}
	e.admin = e.clientset(t, testserver.KubeAdmin)
	return e
}

func (e *kubeEnv) config(user string) *rest.Config {
	return &rest.Config{
		Host:            e.srv.Host(),
		BearerToken:     e.srv.Token(user),
		TLSClientConfig: rest.TLSClientConfig{CAData: e.srv.CAData()},
		QPS:             200,
		Burst:           400,
	}
}

// clientset returns a client of its own for user, closed at the end of the
// test.
func (e *kubeEnv) clientset(t testing.TB, user string) kubernetes.Interface {
	t.Helper()
	cfg := e.config(user)
	cfg.Proxy = http.ProxyFromEnvironment // not shared: ours to close
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfigAndClient(cfg, hc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { utilnet.CloseIdleConnectionsFor(hc.Transport) })
	return cs
}

var nsSeq atomic.Int64

// namespace creates a fresh namespace.
func (e *kubeEnv) namespace(t testing.TB) string {
	t.Helper()
	ns := fmt.Sprintf("rc-%d-%d", time.Now().UnixNano()%1_000_000, nsSeq.Add(1))
	e.createNamespace(t, ns)
	return ns
}

func (e *kubeEnv) createNamespace(t testing.TB, ns string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := e.admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating namespace %s: %v", ns, err)
	}
}

// open returns a Registry for user in ns, closed at the end of the test.
func (e *kubeEnv) open(t testing.TB, user, ns string, ttl time.Duration) *kubeRegistry {
	t.Helper()
	r, err := NewForConfig(e.config(user), &Options{Namespace: ns, TTL: ttl, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r.(*kubeRegistry)
}

func ctxFor(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

var waitFor = testutil.WaitFor

func ids(list []registry.Instance) []string {
	out := make([]string, len(list))
	for i, in := range list {
		out[i] = in.ID
	}
	return out
}

func lease(name string, renew time.Time, secs int32) *coordinationv1.Lease {
	holder := "test"
	rt := metav1.NewMicroTime(renew)
	return &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{LabelAppManagedBy: ManagedBy}},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &secs, RenewTime: &rt, AcquireTime: &rt},
	}
}
