package consul_test

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/backends/consul"
	"github.com/rollcall-go/rollcall/registry"
)

// Opening from a URL does not connect: Ping, Register, Lookup and Watch do.
func Example() {
	r, err := registry.Open(context.Background(), "consul://127.0.0.1:8500/?ttl=10s&token=SECRET")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer r.Close()
	fmt.Println("opened")
	// Output: opened
}

// New takes a consul api client the caller already holds.
func ExampleNew() {
	cli, err := api.NewClient(&api.Config{Address: "127.0.0.1:8500"})
	if err != nil {
		fmt.Println(err)
		return
	}
	r := consul.New(cli, &consul.Options{TTL: 15 * time.Second, WaitTime: 10 * time.Second})
	defer r.Close()
	fmt.Println("ready")
	// Output: ready
}

// Unknown parameters are rejected, and the token stays out of the error.
func Example_badURL() {
	_, err := registry.Open(context.Background(), "consul://127.0.0.1:8500/?token=SECRET&tll=10s")
	fmt.Println(err)
	// Output: registry: invalid URL: consul://127.0.0.1:8500/?tll=10s&token=xxxxx: unknown parameter "tll" (known: ca, ca_file, ca_path, cert, cert_file, dc, deregister_after, insecure_skip_verify, key, key_file, server_name, tls, token, token_file, ttl, wait)
}
