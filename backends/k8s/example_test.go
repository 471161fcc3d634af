package k8s_test

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"

	_ "github.com/rollcall-go/rollcall/backends/k8s"
	"github.com/rollcall-go/rollcall/registry"
)

// Open a registry over the namespace team-a of the cluster a kubeconfig
// points at. In a pod, k8s://team-a alone uses the pod's service account.
// Open does not dial: Ping, Lookup, Watch and Register do.
func Example_openURL() {
	dir, _ := os.MkdirTemp("", "rollcall-example")
	defer os.RemoveAll(dir)
	kubeconfig := filepath.Join(dir, "kubeconfig")
	_ = os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: not-a-real-token}}]
contexts: [{name: ctx, context: {cluster: c, user: u}}]
current-context: ctx
`), 0o600)

	ctx := context.Background()
	r, err := registry.Open(ctx, "k8s://team-a?ttl=10s&kubeconfig="+url.QueryEscape(kubeconfig))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer r.Close()
	// A server registers itself, as a pod of user-rpc would be found, under
	// "service:port" (a port name or number):
	//	reg, err := r.Register(ctx, registry.Instance{Service: "user-rpc:grpc", ID: "worker-1", Addr: "10.0.0.7:9090"})
	// A client follows the endpoints of the Service user-rpc, port grpc,
	// whether pods behind the Service or registered processes:
	//	w, err := r.Watch(ctx, "user-rpc:grpc")
	// With the gRPC resolver the same is the target k8s://team-a/user-rpc:grpc.

	_, err = registry.Open(ctx, "k8s://team-a/user-rpc:grpc")
	fmt.Println(err != nil)
	// Output: true
}
