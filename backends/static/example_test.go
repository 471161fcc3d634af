package static_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/rollcall-go/rollcall/registry"
)

// A fixed list of endpoints (go-zero's direct://): every service has them;
// Register says it is not supported.
func Example() {
	ctx := context.Background()
	r, err := registry.Open(ctx, "static://10.0.0.1:8080,10.0.0.2:8080")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer r.Close()
	got, err := r.Lookup(ctx, "user.rpc")
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, in := range got {
		fmt.Println(in.ID, in.Addr)
	}
	_, err = r.Register(ctx, registry.Instance{Service: "user.rpc", Addr: "10.0.0.3:8080"})
	fmt.Println("register unsupported:", errors.Is(err, errors.ErrUnsupported))
	// Output:
	// 10.0.0.1:8080 10.0.0.1:8080
	// 10.0.0.2:8080 10.0.0.2:8080
	// register unsupported: true
}

// Endpoints per service from a file a developer edits; a change reaches
// every Watcher.
func Example_file() {
	dir, err := os.MkdirTemp("", "rollcall-static-example-")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)
	file := filepath.Join(dir, "endpoints.json")
	write := func(s string) {
		err := os.WriteFile(file+".tmp", []byte(s), 0o644)
		if err == nil {
			err = os.Rename(file+".tmp", file) // as editors save
		}
		if err != nil {
			fmt.Println(err)
		}
	}
	write(`{"user.rpc": ["10.0.0.1:8080", {"addr": "10.0.0.2:8080", "id": "b", "metadata": {"zone": "eu-1a"}}]}`)

	ctx := context.Background()
	r, err := registry.Open(ctx, "static:///?file="+file)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer r.Close()
	w, err := r.Watch(ctx, "user.rpc")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer w.Close()
	u, _ := w.Next(ctx)
	for _, in := range u.Instances() {
		fmt.Println(in.ID, in.Addr, in.Metadata)
	}

	write(`{"user.rpc": [{"addr": "10.0.0.2:8080", "id": "b", "metadata": {"zone": "eu-1a"}}]}`)
	u, _ = w.Next(ctx)
	fmt.Println("removed:", u.Removed[0].ID)
	// Output:
	// 10.0.0.1:8080 10.0.0.1:8080 map[]
	// b 10.0.0.2:8080 map[zone:eu-1a]
	// removed: 10.0.0.1:8080
}
