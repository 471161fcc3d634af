package registry_test

import (
	"context"
	"fmt"
	"log"

	_ "github.com/rollcall-go/rollcall/backends/memory" // registers mem://
	"github.com/rollcall-go/rollcall/registry"
)

// Open a registry by URL, register an instance and follow the service.
func Example() {
	ctx := context.Background()
	reg, err := registry.Open(ctx, "mem://example?ttl=5s")
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Close()

	w, err := reg.Watch(ctx, "user.rpc")
	if err != nil {
		log.Fatal(err)
	}
	defer w.Close()
	u, _ := w.Next(ctx) // the first update is the full list
	fmt.Println("instances at start:", len(u.Instances()))

	r, err := reg.Register(ctx, registry.Instance{
		Service:  "user.rpc",
		ID:       "user-1",
		Addr:     "10.0.0.7:8080",
		Metadata: map[string]string{registry.MetaZone: "eu-1", registry.MetaWeight: "2"},
	})
	if err != nil {
		log.Fatal(err)
	}
	u, _ = w.Next(ctx)
	for _, in := range u.Added {
		fmt.Println("added", in.ID, in.Addr, "zone", in.Zone(), "weight", in.Weight())
	}

	if err := r.Deregister(ctx); err != nil {
		log.Fatal(err)
	}
	u, _ = w.Next(ctx)
	fmt.Println("removed", u.Removed[0].ID, "left:", len(u.Instances()))
	// Output:
	// instances at start: 0
	// added user-1 10.0.0.7:8080 zone eu-1 weight 2
	// removed user-1 left: 0
}

func ExampleOpen_unknownScheme() {
	_, err := registry.Open(context.Background(), "zookeeper://127.0.0.1:2181")
	fmt.Println(err)
	// Output:
	// registry: unknown scheme "zookeeper" (forgotten import?)
}

func ExampleInstance_Validate() {
	err := registry.Instance{Service: "user/rpc", Addr: "10.0.0.7:8080"}.Validate()
	fmt.Println(err)
	// Output:
	// registry: invalid instance: service name "user/rpc" contains '/'; allowed are letters, digits and . _ - :
}
