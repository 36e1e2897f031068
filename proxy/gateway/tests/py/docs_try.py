"""Opens the consumer docs Tollgate serves (/_tollgate/docs) in headless
Chromium (Debian chromium + chromium-driver, through Selenium), sends a
request with "Try it" and prints what the page showed as JSON.

usage: docs_try.py BASE_URL KEY OUT_DIR
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("SE_OFFLINE", "true")

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base, key, out = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out, exist_ok=True)
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             "--user-data-dir=" + tempfile.mkdtemp(prefix="tollgate-chromium-"), "--window-size=1280,1000"]:
    opts.add_argument(flag)
opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    driver.get(base + "/_tollgate/docs")
    result = {"title": driver.title, "plans": [r.get_attribute("data-plan") for r in driver.find_elements(By.CSS_SELECTOR, "#plans tr[data-plan]")]}
    driver.find_element(By.ID, "try-key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#try-form button").click()
    WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "try-status").text not in ("", "…"))
    result["status"] = driver.find_element(By.ID, "try-status").text
    result["headers"] = driver.find_element(By.ID, "try-headers").text
    driver.find_element(By.ID, "try").location_once_scrolled_into_view
    driver.save_screenshot(os.path.join(out, "docs-try-it.png"))
    result["csp_violations"] = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
    result["key_in_url"] = key in driver.current_url
finally:
    driver.quit()
print(json.dumps(result))
