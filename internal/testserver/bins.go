// Package testserver runs real servers (etcd, Consul) as child processes of a
// test, on loopback and free ports, with helpers to pause, stop, restart and
// wipe them.
//
// The server binaries are not built by the tests: scripts/build-servers.sh
// builds them from the wrapper modules under tools/servers/ into a per-user
// cache directory keyed by version, and Binary finds them there.
package testserver

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
)

// Versions maps each server binary to the version scripts/build-servers.sh
// builds. It must match the version required by tools/servers/<name>/go.mod
// (etcd: go.etcd.io/etcd/server/v3, consul: github.com/hashicorp/consul,
// kube-apiserver: k8s.io/kubernetes); a test checks that.
var Versions = map[string]string{
	"etcd":           "v3.6.16",
	"consul":         "v1.16.3",
	"kube-apiserver": "v1.37.1",
}

// CacheDir returns the directory holding the built servers, using the same rule
// as scripts/build-servers.sh:
//
//	${ROLLCALL_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rollcall/servers}
func CacheDir() (string, error) {
	if dir := os.Getenv("ROLLCALL_SERVER_CACHE"); dir != "" {
		return dir, nil
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home := os.Getenv("HOME")
		if home == "" {
			return "", errors.New("testserver: neither ROLLCALL_SERVER_CACHE, XDG_CACHE_HOME nor HOME is set")
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "rollcall", "servers"), nil
}

// Binary returns the path of the cached server binary name ("etcd", "consul"
// or "kube-apiserver"). If it has not been built, the error says how to build
// it.
func Binary(name string) (string, error) {
	version, ok := Versions[name]
	if !ok {
		names := make([]string, 0, len(Versions))
		for n := range Versions {
			names = append(names, n)
		}
		sort.Strings(names)
		return "", fmt.Errorf("testserver: unknown server %q (known: %v)", name, names)
	}
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	path := filepath.Join(cache, name+"-"+version, name)
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return "", fmt.Errorf("testserver: %s %s is not built (no %s): run scripts/build-servers.sh %s", name, version, path, name)
	case err != nil:
		return "", fmt.Errorf("testserver: %s %s: %w; run scripts/build-servers.sh %s", name, version, err, name)
	case !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0:
		return "", fmt.Errorf("testserver: %s is not an executable file: run scripts/build-servers.sh %s", path, name)
	}
	return path, nil
}

// KubebuilderAssets returns a directory holding etcd and kube-apiserver, for
// controller-runtime's envtest (set KUBEBUILDER_ASSETS or
// envtest.Environment.BinaryAssetsDirectory to it). It is
// <cache>/kubebuilder-assets, maintained by scripts/build-servers.sh; links
// that are missing or stale are (re)created here when the binaries are built.
func KubebuilderAssets() (string, error) {
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cache, "kubebuilder-assets")
	for _, name := range []string{"etcd", "kube-apiserver"} {
		bin, err := Binary(name)
		if err != nil {
			return "", err
		}
		link := filepath.Join(dir, name)
		target := filepath.Join("..", name+"-"+Versions[name], name)
		if got, err := os.Readlink(link); err == nil && got == target {
			if _, err := os.Stat(link); err == nil {
				continue
			}
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", fmt.Errorf("testserver: kubebuilder assets: %w", err)
		}
		// Replace atomically, so that concurrent test binaries never see a
		// missing link.
		tmp := fmt.Sprintf("%s.tmp.%d", link, os.Getpid())
		_ = os.Remove(tmp)
		if err := os.Symlink(target, tmp); err != nil {
			return "", fmt.Errorf("testserver: kubebuilder assets: %w", err)
		}
		if err := os.Rename(tmp, link); err != nil {
			_ = os.Remove(tmp)
			return "", fmt.Errorf("testserver: kubebuilder assets: link %s to %s: %w", link, bin, err)
		}
	}
	return dir, nil
}
