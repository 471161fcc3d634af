package interop

import (
	"context"
	"fmt"
	"os"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/zeromicro/go-zero/core/logx"
	zrpcresolver "github.com/zeromicro/go-zero/zrpc/resolver"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	_ "github.com/rollcall-go/rollcall/backends/etcd"
	_ "github.com/rollcall-go/rollcall/grpcresolver"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// The explicit choice the README asks of a binary that links both go-zero's
// zrpc and rollcall's grpcresolver: this package's init runs after theirs
// (a package is initialized after everything it imports), so plain etcd://
// and k8s:// are go-zero's here whatever order their inits ran in; rollcall
// targets use rollcall+etcd://.
func init() {
	zrpcresolver.Register()
	logx.Disable() // go-zero logs to stdout otherwise
}

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, append(leftByGoZero, goleak.Cleanup(func(code int) {
		if code == 0 {
			if err := ownGoroutinesGone(5 * time.Second); err != nil {
				fmt.Fprintln(os.Stderr, err)
				code = 1
			}
		}
		os.Exit(code)
	}))...)
}

// leftByGoZero are the goroutines go-zero leaves behind by design: two
// started by its packages' init (signal handling, CPU usage stats), and the
// etcd clients of its discov package, which it keeps in a process-wide
// registry (internal.GetRegistry, one client per set of endpoints) for the
// life of the process: a Subscriber's Close and a Publisher's Stop do not
// close them, and they go on reconnecting to the test's etcd after it
// stopped. goleak cannot tell a go-zero client's goroutines from another
// etcd client's, so the goroutines every clientv3.Client runs are ignored
// here; rollcall's own clients are checked by the goleak of the root
// module's packages, and ownGoroutinesGone checks here that no goroutine of
// rollcall's or kratos' code is left.
var leftByGoZero = []goleak.Option{
	goleak.IgnoreTopFunction("github.com/zeromicro/go-zero/core/proc.init.1.func1"),
	goleak.IgnoreTopFunction("github.com/zeromicro/go-zero/core/stat.init.1.func1"),
	goleak.IgnoreAnyFunction("github.com/zeromicro/go-zero/core/discov/internal.(*cluster).watchConnState"),
	goleak.IgnoreAnyFunction("github.com/zeromicro/go-zero/core/discov/internal.(*cluster).watch"),
	goleak.IgnoreAnyFunction("go.etcd.io/etcd/client/v3.(*Client).autoSync"),
	goleak.IgnoreAnyFunction("go.etcd.io/etcd/client/v3.(*lessor).deadlineLoop"),
	goleak.IgnoreAnyFunction("go.etcd.io/etcd/client/v3.(*lessor).keepAliveCtxCloser"),
	goleak.IgnoreAnyFunction("go.etcd.io/etcd/client/v3.(*lessor).recvKeepAliveLoop"),
	goleak.IgnoreAnyFunction("go.etcd.io/etcd/client/v3.(*lessor).sendKeepAliveLoop"),
	goleak.IgnoreAnyFunction("go.etcd.io/etcd/client/v3.(*watchGRPCStream).run"),
	goleak.IgnoreAnyFunction("go.etcd.io/etcd/client/v3.(*watchGRPCStream).waitCancelSubstreams.func1"),
	goleak.IgnoreAnyFunction("go.etcd.io/etcd/client/v3.(*watchGRPCStream).waitCancelSubstreams.func2"),
	goleak.IgnoreAnyFunction("google.golang.org/grpc/internal/grpcsync.(*CallbackSerializer).run"),
	goleak.IgnoreAnyFunction("google.golang.org/grpc.(*addrConn).resetTransportAndUnlock"),
	goleak.IgnoreTopFunction("context.(*cancelCtx).propagateCancel.func2"),
}

// ownGoroutinesGone waits up to limit for every goroutine running code of
// rollcall (other than this package's TestMain) or kratos to end, and
// returns an error listing those that did not.
func ownGoroutinesGone(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		buf := make([]byte, 8<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var left []string
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "github.com/rollcall-go/rollcall/interop.TestMain") {
				continue
			}
			if strings.Contains(g, "github.com/rollcall-go/rollcall/") || strings.Contains(g, "github.com/go-kratos/") {
				left = append(left, g)
			}
		}
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("interop: %d goroutines of rollcall or kratos left after the tests:\n\n%s", len(left), strings.Join(left, "\n\n"))
		}
		time.Sleep(50 * time.Millisecond) // polling, not synchronisation
	}
}

// startEtcd starts a real etcd for the test and returns its endpoint.
func startEtcd(t *testing.T) string {
	t.Helper()
	return testserver.StartEtcd(t).Endpoint()
}

// adminClient is a plain clientv3 client of ep, closed when the test ends.
func adminClient(t *testing.T, ep string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// open opens a rollcall registry from url, closed when the test ends.
func open(t *testing.T, url string) registry.Registry {
	t.Helper()
	r, err := registry.Open(context.Background(), url)
	if err != nil {
		t.Fatalf("Open(%q): %v", url, err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// keys returns the keys under prefix and their values.
func keys(t *testing.T, cli *clientv3.Client, prefix string) map[string]string {
	t.Helper()
	resp, err := cli.Get(ctxT(t), prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, kv := range resp.Kvs {
		out[string(kv.Key)] = string(kv.Value)
	}
	return out
}

// pkgOf returns the package path of b's dynamic type.
func pkgOf(b any) string {
	if b == nil {
		return "<nil>"
	}
	t := reflect.TypeOf(b)
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t.PkgPath()
}
