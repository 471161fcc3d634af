package nacos_test

import (
	"context"
	"fmt"
	"log"

	"github.com/rollcall-go/rollcall/backends/nacos"
	"github.com/rollcall-go/rollcall/registry"
)

// Open takes a nacos:// URL; it does not dial (the SDK client is made on first
// use), and its errors never show the password.
func Example_open() {
	ctx := context.Background()
	r, err := registry.Open(ctx, "nacos://nacos:s3cret@10.0.0.1:8848,10.0.0.2:8848/?namespace=dev&group=team-a&ttl=10s")
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()
	fmt.Println("opened")

	_, err = registry.Open(ctx, "nacos://nacos:s3cret@10.0.0.1:8848/?colour=blue")
	fmt.Println(err)
	// Output:
	// opened
	// registry: invalid URL: nacos://nacos:xxxxx@10.0.0.1:8848/?colour=blue: unknown parameter "colour" (known: cluster, group, namespace, timeout, ttl)
}

// New wraps an SDK client the caller holds; NewClient makes one with the
// settings the backend relies on.
func ExampleNew() {
	cli, err := nacos.NewClient(nacos.ClientOptions{Servers: []string{"127.0.0.1:8848"}, Namespace: "dev"})
	if err != nil {
		log.Fatal(err)
	}
	defer cli.CloseClient()
	r, err := nacos.New(cli, &nacos.Options{Group: "team-a"})
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()
	reg, err := r.Register(context.Background(), registry.Instance{Service: "user.rpc", Addr: "10.0.0.7:8080",
		Metadata: map[string]string{registry.MetaWeight: "3"}})
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Deregister(context.Background())
}
