package nacos

import (
	"errors"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

func TestParseURL(t *testing.T) {
	good := []struct {
		url     string
		servers []string
		ns      string
		group   string
		cluster string
		ttl     time.Duration
		timeout time.Duration
		user    string
		pass    string
	}{
		{url: "nacos://127.0.0.1:8848", servers: []string{"127.0.0.1:8848"}, ttl: driver.DefaultTTL, timeout: DefaultTimeout},
		{url: "nacos://127.0.0.1:8848/", servers: []string{"127.0.0.1:8848"}, ttl: driver.DefaultTTL, timeout: DefaultTimeout},
		{url: "nacos://nacos.internal", servers: []string{"nacos.internal:8848"}, ttl: driver.DefaultTTL, timeout: DefaultTimeout},
		{url: "nacos://h3,h1:8848,h2:9848/?namespace=dev&group=team-a&cluster=hz-1&ttl=3s&timeout=2s",
			servers: []string{"h3:8848", "h1:8848", "h2:9848"}, ns: "dev", group: "team-a", cluster: "hz-1", ttl: 3 * time.Second, timeout: 2 * time.Second},
		{url: "nacos://nacos:s3cret@[::1]:8848/?group=G", servers: []string{"[::1]:8848"}, group: "G", user: "nacos", pass: "s3cret", ttl: driver.DefaultTTL, timeout: DefaultTimeout},
		{url: "nacos://u@[::1]", servers: []string{"[::1]:8848"}, user: "u", ttl: driver.DefaultTTL, timeout: DefaultTimeout},
	}
	for _, tc := range good {
		u, err := url.Parse(tc.url)
		if err != nil {
			t.Fatal(err)
		}
		co, o, err := parseURL(u)
		if err != nil {
			t.Errorf("parseURL(%q): %v", tc.url, err)
			continue
		}
		if !slices.Equal(co.Servers, tc.servers) || co.Namespace != tc.ns || o.Group != tc.group || o.Cluster != tc.cluster ||
			o.TTL != tc.ttl || co.Timeout != tc.timeout || co.Username != tc.user || co.Password != tc.pass {
			t.Errorf("parseURL(%q) = %+v, %+v", tc.url, co, o)
		}
	}

	bad := []string{
		"nacos://h:8848/?unknown=1",
		"nacos://h:8848/?ttl=banana",
		"nacos://h:8848/?ttl=-1s",
		"nacos://h:8848/?timeout=0s",
		"nacos://h:8848/?group=a@@b",
		"nacos://h:8848/?group=a%20b",
		"nacos://h:8848/?namespace=a/b",
		"nacos://h:8848/?cluster=bad_cluster",
		"nacos://h:8848/?group=a&group=b",
		"nacos://h:8848/some/path",
		"nacos://h:8848/#frag",
		"nacos:///",
		"nacos:opaque",
		"nacos://h:0",
		"nacos://h:65000", // gRPC would be on 66000
		"nacos://h:port",
		"nacos://h1:8848,,h2:8848",
		"nacos://:8848",
		"nacos://:s3cret@h:8848",
		"nacos://user:s3cret@h:8848/?bogus=1",
		"nacos://user:s3cret@h:8848/path",
	}
	for _, raw := range bad {
		u, err := url.Parse(raw)
		if err != nil {
			continue // registry.Open rejects it before us
		}
		_, _, err = parseURL(u)
		if !errors.Is(err, registry.ErrInvalidURL) {
			t.Errorf("parseURL(%q) = %v, want ErrInvalidURL", raw, err)
			continue
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("parseURL(%q) error reveals the password: %v", raw, err)
		}
	}
}

func TestScrub(t *testing.T) {
	addSecret("hunter22")
	defer removeSecret("hunter22")
	for in, want := range map[string]string{
		"login with password hunter22 failed":                  "login with password xxxxx failed",
		`headers:map[accessToken:eyJhbGciOi.x-y Client:Go]`:    `headers:map[accessToken:xxxxx Client:Go]`,
		`{"accessToken":"eyJhbGciOi","tokenTtl":18000}`:        `{"accessToken":"xxxxx","tokenTtl":18000}`,
		"url?accessToken=abc&serviceName=x":                    "url?accessToken=xxxxx&serviceName=x",
		"nothing secret here: register instance 10.0.0.1:8080": "nothing secret here: register instance 10.0.0.1:8080",
	} {
		if got := scrub(in); got != want {
			t.Errorf("scrub(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestCheckMetadata(t *testing.T) {
	for md, ok := range map[[2]string]bool{
		{"", ""}:                            true,
		{metaHeartBeatInterval, "1000"}:     true,
		{metaHeartBeatInterval, "20000"}:    false, // more than the default timeout
		{metaHeartBeatTimeout, "abc"}:       false,
		{metaIPDeleteTimeout, "100"}:        false,
		{"preserved.something.else", "x y"}: true,
	} {
		in := driver.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:80", Metadata: map[string]string{md[0]: md[1]}}
		err := checkMetadata(in)
		if (err == nil) != ok || err != nil && !errors.Is(err, registry.ErrInvalidInstance) {
			t.Errorf("checkMetadata(%v) = %v", md, err)
		}
	}
}
